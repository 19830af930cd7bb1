/**
 * Creates a wallet through @dfns/sdk, with dfns-agent signing the user action.
 *
 *   DFNS_API_URL=https://api.dfns.io DFNS_AUTH_TOKEN=... [DFNS_AGENT_SOCKET=...] [DFNS_AGENT_CREDENTIAL=...] \
 *   [WALLET_NETWORK=EthereumSepolia] [WALLET_NAME=...] node dist/createWallet.js
 *
 * Prints the new wallet as JSON; on failure prints the error and exits 1.
 */
import { DfnsApiClient, DfnsError } from '@dfns/sdk';
import type { CreateWalletBody } from '@dfns/sdk/generated/wallets';
import { AgentError, AgentSigner } from './agentSigner';

function required(name: string): string {
  const value = process.env[name];
  if (!value) throw new Error(`set ${name}`);
  return value;
}

async function main(): Promise<void> {
  const signer = new AgentSigner({
    socketPath: process.env.DFNS_AGENT_SOCKET || undefined,
    credential: process.env.DFNS_AGENT_CREDENTIAL || undefined,
  });
  const dfns = new DfnsApiClient({
    baseUrl: process.env.DFNS_API_URL || 'https://api.dfns.io',
    authToken: required('DFNS_AUTH_TOKEN'),
    signer,
  });
  const body: CreateWalletBody = {
    network: (process.env.WALLET_NETWORK || 'EthereumSepolia') as CreateWalletBody['network'],
    name: process.env.WALLET_NAME || undefined,
  };
  const wallet = await dfns.wallets.createWallet({ body });
  console.log(JSON.stringify(wallet));
}

main().catch((e: unknown) => {
  if (e instanceof AgentError) console.error(`dfns-agent refused to sign: ${e.message}`);
  else if (e instanceof DfnsError) console.error(`Dfns answered ${e.httpStatus}: ${e.message}`);
  else console.error(e instanceof Error ? e.message : e);
  process.exitCode = 1;
});
