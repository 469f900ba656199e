# Least-privilege policy for cybedefend-bridge, for the example configuration:
#   sources: [{mount: secret, path: dockerhub}]     ledger.state_path: cybedefend-bridge/{instance}
# Adapt the mount and prefixes to your configuration; `cybedefend-bridge check` reports what is
# missing. The bridge never writes to the source tree and never deletes anything.
#
# HashiCorp Vault does not know the `scan` capability (an OpenBao addition): remove it there;
# the bridge then lists recursively with LIST instead.

# Discovery. `list` lists the prefix (LIST on secret/metadata/dockerhub/: one request when it has
# no sub-folders); where it has sub-folders, `scan` lets OpenBao return the whole subtree in one
# request, else each sub-folder is listed with LIST; `read` on metadata gives
# each secret's version and custom_metadata (the tags) without reading its value. The `/*`
# glob also matches the prefix folder itself (secret/metadata/dockerhub/).
path "secret/metadata/dockerhub/*" {
  capabilities = ["list", "scan", "read"]
}

# Values: read only for secrets that need a write to CybeDefend (new or rotated), at the
# version seen in metadata (GET secret/data/<path>?version=N).
path "secret/data/dockerhub/*" {
  capabilities = ["read"]
}

# The bridge's own state (fingerprint/marker key, HA lease), outside every source prefix: the
# only path this policy may write. Whoever may write tagged secrets must not be able to write
# here, or they could forge the lease. Check-and-set writes
# (create for the first write, update after), read back. No delete: state is never removed.
path "secret/data/cybedefend-bridge/*" {
  capabilities = ["create", "read", "update"]
}

# A check-and-set write after the state's current version was deleted needs that version,
# which only the metadata shows.
path "secret/metadata/cybedefend-bridge/*" {
  capabilities = ["read"]
}

# Token self-management, as Vault Agent does it: learn the TTL (also the /readyz probe),
# renew before expiry, revoke at shutdown. (The `default` policy grants these too; they are
# listed so that this policy works alone, with no_default_policy.)
path "auth/token/lookup-self" {
  capabilities = ["read"]
}

path "auth/token/renew-self" {
  capabilities = ["update"]
}

path "auth/token/revoke-self" {
  capabilities = ["update"]
}

# `cybedefend-bridge check` asks what this token may do, path by path.
path "sys/capabilities-self" {
  capabilities = ["update"]
}

# kv_version: auto — learn once whether the mount is KV v1 or v2.
path "sys/internal/ui/mounts/secret" {
  capabilities = ["read"]
}

# Only when cybedefend.auth.credential_vault_path points into Vault, e.g. secret/cybedefend#pat:
# path "secret/data/cybedefend" {
#   capabilities = ["read"]
# }
