"""Throughput and latency benchmark: the agent vs. OpenSSH ssh-agent vs. in-process python-pkcs11.

Run ``python -m bench`` from the repository root. Everything it needs (a SoftHSM token, keys, the agent,
ssh-agent) is created in a temporary directory and removed afterwards, so runs never share state.
"""
