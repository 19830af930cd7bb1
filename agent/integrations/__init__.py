"""Adapters that plug the agent into third-party Dfns SDKs (see dfns_sdk.py for the official Python SDK)."""
