"""Tenants: API keys, quotas and fair shares (see quotas.py)."""
