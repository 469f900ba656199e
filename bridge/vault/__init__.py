"""Vault / OpenBao: the only package that imports hvac and requests.

`transport` (pooled HTTP, rate limit, error translation) < `session` (the token's lifecycle)
< `source` (discovery, values, the state store).
"""
