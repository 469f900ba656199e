"""Vault / OpenBao: the only package that talks to Vault (and the only one that imports hvac).

`transport` (pooled HTTP, rate limit, error translation) < `session` (the token's lifecycle)
< `source` (discovery, values, the state store). `hvac_client`: hvac, imported on first use by
the rare calls that still go through it, never by a routine path (ADR 15).
"""
