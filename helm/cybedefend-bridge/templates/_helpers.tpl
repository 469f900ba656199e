{{/* Names, labels and the rendered bridge config. */}}

{{- define "cybedefend-bridge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "cybedefend-bridge.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "cybedefend-bridge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cybedefend-bridge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "cybedefend-bridge.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "cybedefend-bridge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: cybedefend-bridge
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "cybedefend-bridge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "cybedefend-bridge.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "cybedefend-bridge.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Paths inside the container; the config below points the bridge at them. */}}
{{- define "cybedefend-bridge.credentialFile" -}}/var/run/secrets/cybedefend-bridge/cybedefend/{{ .Values.cybedefend.secretKey }}{{- end -}}
{{- define "cybedefend-bridge.webhookTokenFile" -}}/var/run/secrets/cybedefend-bridge/webhook/{{ .Values.webhook.secretKey }}{{- end -}}
{{- define "cybedefend-bridge.vaultCaFile" -}}/etc/cybedefend-bridge-vault-ca/{{ .Values.vault.ca.key }}{{- end -}}
{{- define "cybedefend-bridge.ledgerDir" -}}/var/lib/cybedefend-bridge{{- end -}}

{{/* Checks that values.schema.json cannot express (they span several keys). */}}
{{- define "cybedefend-bridge.validate" -}}
{{- $auth := (.Values.config.cybedefend | default dict).auth | default dict -}}
{{- if and .Values.cybedefend.existingSecret $auth.credential_vault_path -}}
{{- fail "set either cybedefend.existingSecret or config.cybedefend.auth.credential_vault_path, not both" -}}
{{- end -}}
{{- if not (or .Values.cybedefend.existingSecret $auth.credential_vault_path) -}}
{{- fail "cybedefend.existingSecret (a Secret holding the CybeDefend PAT) or config.cybedefend.auth.credential_vault_path is required" -}}
{{- end -}}
{{- if and .Values.ha.enabled (lt (int .Values.replicaCount) 2) -}}
{{- fail "ha.enabled needs replicaCount >= 2" -}}
{{- end -}}
{{- if and (not .Values.ha.enabled) (gt (int .Values.replicaCount) 1) -}}
{{- fail "replicaCount > 1 needs ha.enabled: true (otherwise several bridges would act at once)" -}}
{{- end -}}
{{- if and .Values.ha.enabled .Values.persistence.enabled -}}
{{- fail "ha.enabled with persistence.enabled: replicas cannot share one ledger volume; use the default emptyDir (the ledger is rebuilt from Vault)" -}}
{{- end -}}
{{- if and .Values.ha.enabled .Values.podDisruptionBudget.enabled -}}
{{- fail "podDisruptionBudget.enabled with ha.enabled: only the leader is Ready, so a PDB would block evicting it forever; leave the PDB off with HA" -}}
{{- end -}}
{{- $ledger := .Values.config.ledger | default dict -}}
{{- if and (eq ($ledger.key_source | default "vault") "file") (not .Values.persistence.enabled) -}}
{{- fail "config.ledger.key_source: file needs persistence.enabled: true (the key must survive restarts)" -}}
{{- end -}}
{{- if and .Values.auditSocket.enabled (not .Values.auditSocket.allowedPeers) -}}
{{- fail "auditSocket.enabled needs auditSocket.allowedPeers (the CIDRs of the Vault pods); the bridge refuses other peers" -}}
{{- end -}}
{{- if and .Values.vault.ca.secretName .Values.vault.ca.configMapName -}}
{{- fail "set either vault.ca.secretName or vault.ca.configMapName, not both" -}}
{{- end -}}
{{- if and .Values.config.triggers (.Values.config.triggers | default dict).audit_ingest (not .Values.webhook.existingSecret) -}}
{{- fail "config.triggers.audit_ingest needs webhook.existingSecret (POST /v1/audit is authenticated with the webhook token)" -}}
{{- end -}}
{{- end -}}

{{/* The bridge's config.yaml: values.config with the keys the chart owns set over it. */}}
{{- define "cybedefend-bridge.config" -}}
{{- $cfg := deepCopy (.Values.config | default dict) -}}
{{- $vault := get $cfg "vault" | default dict -}}
{{- if eq .Values.mode "sidecar" -}}
{{- $_ := set $vault "auth" (dict "method" "token" "token_file" .Values.vault.agent.tokenFile) -}}
{{- else -}}
{{- $auth := dict "method" "kubernetes" "role" .Values.vault.kubernetesAuth.role -}}
{{- with .Values.vault.kubernetesAuth.mount }}{{ $_ := set $auth "mount" . }}{{ end -}}
{{- $_ := set $vault "auth" $auth -}}
{{- end -}}
{{- if or .Values.vault.ca.secretName .Values.vault.ca.configMapName -}}
{{- $tls := get $vault "tls" | default dict -}}
{{- $_ := set $tls "ca_cert" (include "cybedefend-bridge.vaultCaFile" .) -}}
{{- $_ := set $vault "tls" $tls -}}
{{- end -}}
{{- $_ := set $cfg "vault" $vault -}}
{{- if .Values.cybedefend.existingSecret -}}
{{- $cd := get $cfg "cybedefend" | default dict -}}
{{- $cdauth := get $cd "auth" | default dict -}}
{{- $_ := set $cdauth "credential_file" (include "cybedefend-bridge.credentialFile" .) -}}
{{- $_ := set $cd "auth" $cdauth -}}
{{- $_ := set $cfg "cybedefend" $cd -}}
{{- end -}}
{{- $server := get $cfg "server" | default dict -}}
{{- $_ := set $server "bind" "0.0.0.0" -}}
{{- $_ := set $server "port" 8080 -}}
{{- if .Values.webhook.existingSecret -}}
{{- $_ := set $server "webhook_token_file" (include "cybedefend-bridge.webhookTokenFile" .) -}}
{{- end -}}
{{- $_ := set $cfg "server" $server -}}
{{- $ledger := get $cfg "ledger" | default dict -}}
{{- $_ := set $ledger "path" (printf "%s/ledger.sqlite3" (include "cybedefend-bridge.ledgerDir" .)) -}}
{{- $_ := set $cfg "ledger" $ledger -}}
{{- $ha := get $cfg "ha" | default dict -}}
{{- $_ := set $ha "enabled" .Values.ha.enabled -}}
{{- $_ := set $cfg "ha" $ha -}}
{{- if .Values.auditSocket.enabled -}}
{{- $triggers := get $cfg "triggers" | default dict -}}
{{- $sock := get $triggers "audit_socket" | default dict -}}
{{- $_ := set $sock "bind" "0.0.0.0" -}}
{{- $_ := set $sock "port" (int .Values.auditSocket.port) -}}
{{- with .Values.auditSocket.allowedPeers }}{{ $_ := set $sock "allowed_peers" . }}{{ end -}}
{{- $_ := set $triggers "audit_socket" $sock -}}
{{- $_ := set $cfg "triggers" $triggers -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* Schedule interval in seconds, for alert thresholds. */}}
{{- define "cybedefend-bridge.intervalSeconds" -}}
{{- $schedule := (.Values.config.schedule | default dict) -}}
{{- $schedule.interval_seconds | default 300 | int -}}
{{- end -}}

{{/* PromQL label matcher selecting this release's bridge series. */}}
{{- define "cybedefend-bridge.promSelector" -}}
job="{{ include "cybedefend-bridge.fullname" . }}", namespace="{{ .Release.Namespace }}"
{{- end -}}
