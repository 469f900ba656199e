"""CybeDefend: the only package that imports httpx to talk to CybeDefend.

`api` (endpoint table, tolerant decoding, error text; no HTTP) and `auth` (PAT/API key, bearer
cache) are used by `client`, the `Registrar` implementation.
"""
