/**
 * A `CredentialSigner` for `@dfns/sdk` backed by dfns-agent: the SDK makes the Dfns calls, the agent signs
 * each user-action challenge with a key that never leaves its HSM.
 *
 *   const signer = new AgentSigner({ credential: 'treasury' });
 *   const dfns = new DfnsApiClient({ baseUrl, authToken, signer });
 *
 * The challenge goes to the agent's `POST /v1/sign` over its Unix socket exactly as `/auth/action/init`
 * returned it; the agent answers the `firstFactor` ({kind: 'Key', credentialAssertion}) the SDK sends on.
 */
import { request } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { CredentialSigner, KeyAssertion, UserActionChallenge } from '@dfns/sdk';

export type AgentSignerOptions = {
  /** The agent's socket; default: as `dfns-agent serve` picks it. */
  socketPath?: string;
  /** Agent credential to sign with; default: the first one the challenge allows. */
  credential?: string;
  /** Per request to the agent, in milliseconds. */
  timeoutMs?: number;
};

/** The agent refused or failed (`code` is its stable error code), or could not be reached. */
export class AgentError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
  ) {
    super(`${code}: ${message}`);
    this.name = 'AgentError';
  }
}

/** `$XDG_RUNTIME_DIR/dfns-agent/agent.sock`, else `<tmpdir>/dfns-agent-<uid>/agent.sock`, like the agent. */
export function defaultSocketPath(): string {
  const runtime = process.env.XDG_RUNTIME_DIR;
  if (runtime) return join(runtime, 'dfns-agent', 'agent.sock');
  return join(tmpdir(), `dfns-agent-${process.getuid?.() ?? 0}`, 'agent.sock');
}

export class AgentSigner implements CredentialSigner<KeyAssertion> {
  readonly socketPath: string;
  readonly credential?: string;
  private readonly timeoutMs: number;

  constructor(options: AgentSignerOptions = {}) {
    this.socketPath = options.socketPath ?? defaultSocketPath();
    this.credential = options.credential;
    this.timeoutMs = options.timeoutMs ?? 30_000;
  }

  async sign(challenge: UserActionChallenge): Promise<KeyAssertion> {
    const body = this.credential === undefined ? { challenge } : { challenge, credential: this.credential };
    const answer = await this.post('/v1/sign', body);
    const assertion = answer.credentialAssertion as Record<string, unknown> | undefined;
    const fields = ['credId', 'clientData', 'signature'] as const;
    if (answer.kind !== 'Key' || !assertion || !fields.every((f) => typeof assertion[f] === 'string')) {
      throw new AgentError(200, 'bad_response', "the agent's /v1/sign answer is not a Key credential assertion");
    }
    return answer as KeyAssertion;
  }

  private post(path: string, body: unknown): Promise<Record<string, unknown>> {
    const data = JSON.stringify(body);
    return new Promise((resolve, reject) => {
      const req = request(
        {
          socketPath: this.socketPath,
          path,
          method: 'POST',
          headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(data) },
          timeout: this.timeoutMs,
        },
        (res) => {
          const chunks: Buffer[] = [];
          res.on('data', (chunk: Buffer) => chunks.push(chunk));
          res.on('error', reject);
          res.on('end', () => {
            const status = res.statusCode ?? 0;
            let parsed: unknown;
            try {
              parsed = JSON.parse(Buffer.concat(chunks).toString('utf8'));
            } catch {
              parsed = undefined;
            }
            if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) {
              reject(new AgentError(status, 'bad_response', `agent answered ${status} without a JSON object`));
            } else if (status !== 200) {
              const err = (parsed as { error?: { code?: string; message?: string } }).error ?? {};
              reject(new AgentError(status, err.code ?? 'unknown', err.message ?? `HTTP ${status}`));
            } else {
              resolve(parsed as Record<string, unknown>);
            }
          });
        },
      );
      req.on('timeout', () =>
        req.destroy(new AgentError(0, 'agent_timeout', `no answer from the agent within ${this.timeoutMs} ms`)),
      );
      req.on('error', (e: Error) =>
        reject(
          e instanceof AgentError
            ? e
            : new AgentError(0, 'agent_unreachable', `cannot reach the agent at ${this.socketPath}: ${e.message}`),
        ),
      );
      req.end(data);
    });
  }
}
