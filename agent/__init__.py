"""dfns-agent: signs Dfns user-action challenges with keys that never leave a PKCS#11 token."""

__version__ = "0.1.0"
