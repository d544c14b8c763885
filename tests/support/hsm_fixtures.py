"""Fixtures for SoftHSM2 tokens, keystores and key services (owned by the key-service work)."""
