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
{{- define "cybedefend-bridge.metricsTokenFile" -}}/var/run/secrets/cybedefend-bridge/metrics/{{ .Values.metricsAuth.secretKey }}{{- end -}}
{{- define "cybedefend-bridge.tlsDir" -}}/var/run/secrets/cybedefend-bridge/tls{{- end -}}
{{- define "cybedefend-bridge.auditFilePath" -}}{{ .Values.vaultServerSidecar.auditMountPath | trimSuffix "/" }}/{{ .Values.vaultServerSidecar.auditFile }}{{- end -}}

{{/* Whether a monitoring.coreos.com kind is served by the cluster (or rendering is forced). */}}
{{- define "cybedefend-bridge.hasMonitoringApi" -}}
{{- $kind := .kind -}}
{{- if or .force (.root.Capabilities.APIVersions.Has (printf "monitoring.coreos.com/v1/%s" $kind)) -}}true{{- end -}}
{{- end -}}

{{/* Checks that values.schema.json cannot express (they span several keys). */}}
{{- define "cybedefend-bridge.validate" -}}
{{- $auth := (.Values.config.cybedefend | default dict).auth | default dict -}}
{{- if and .Values.cybedefend.existingSecret $auth.credential_vault_path -}}
{{- fail "set either cybedefend.existingSecret or config.cybedefend.auth.credential_vault_path, not both" -}}
{{- end -}}
{{- if not (or .Values.cybedefend.existingSecret $auth.credential_vault_path) -}}
{{- fail "cybedefend.existingSecret (a Secret holding the CybeDefend PAT) or config.cybedefend.auth.credential_vault_path is required" -}}
{{- end -}}
{{- $vss := .Values.vaultServerSidecar.enabled -}}
{{- if and $vss (eq .Values.mode "sidecar") -}}
{{- fail "vaultServerSidecar.enabled runs the bridge inside the Vault server pod: use mode cluster (Kubernetes auth with the Vault pod's ServiceAccount), not sidecar" -}}
{{- end -}}
{{- if and $vss (or .Values.metrics.serviceMonitor.enabled .Values.auditSocket.enabled .Values.persistence.enabled) -}}
{{- fail "vaultServerSidecar.enabled renders no Service or PVC: metrics.serviceMonitor, auditSocket and persistence must stay off (scrape the Vault pod's port 8080 with a PodMonitor of your own)" -}}
{{- end -}}
{{- if and (eq .Values.mode "sidecar") .Values.vault.agent.injector (not $vss) -}}
{{- /* The Vault Agent injector's admission rules (vault-k8s agent-inject/agent), checked here so helm fails before the webhook does. */ -}}
{{- $uid := .Values.securityContext.runAsUser | default 0 | int64 -}}
{{- if le $uid 0 -}}
{{- fail "mode sidecar: securityContext.runAsUser must be set and non-zero (the injector's agent-run-as-same-user reads Containers[0].securityContext.runAsUser and refuses nil or 0)" -}}
{{- end -}}
{{- if le (.Values.securityContext.runAsGroup | default 0 | int64) 0 -}}
{{- fail "mode sidecar: securityContext.runAsGroup must be set and non-zero (it becomes the agent's vault.hashicorp.com/agent-run-as-group)" -}}
{{- end -}}
{{- if not .Values.serviceAccount.automountServiceAccountToken -}}
{{- fail "mode sidecar with vault.agent.injector: serviceAccount.automountServiceAccountToken must be true (the injector needs the token mount; it refuses the pod otherwise)" -}}
{{- end -}}
{{- if not (default .Values.vault.kubernetesAuth.role .Values.vault.agent.role) -}}
{{- fail "mode sidecar: vault.agent.role or vault.kubernetesAuth.role is required (the injector refuses a pod without a Vault role)" -}}
{{- end -}}
{{- end -}}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) -}}
{{- fail "tls.enabled needs tls.existingSecret (a kubernetes.io/tls Secret with the certificate and key)" -}}
{{- end -}}
{{- if and .Values.ha.enabled (not $vss) (lt (int .Values.replicaCount) 2) -}}
{{- fail "ha.enabled needs replicaCount >= 2" -}}
{{- end -}}
{{- if and (not .Values.ha.enabled) (gt (int .Values.replicaCount) 1) -}}
{{- fail "replicaCount > 1 needs ha.enabled: true (otherwise several bridges would act at once)" -}}
{{- end -}}
{{- if and .Values.ha.enabled .Values.persistence.enabled -}}
{{- fail "ha.enabled with persistence.enabled: replicas cannot share one ledger volume; use the default emptyDir (the ledger is rebuilt from Vault)" -}}
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
{{- /* Only when set: the bridge's settings forbid unknown keys, so an unset option must not appear. */ -}}
{{- if .Values.tls.enabled -}}
{{- $_ := set $server "tls_cert_file" (printf "%s/%s" (include "cybedefend-bridge.tlsDir" .) .Values.tls.certKey) -}}
{{- $_ := set $server "tls_key_file" (printf "%s/%s" (include "cybedefend-bridge.tlsDir" .) .Values.tls.keyKey) -}}
{{- end -}}
{{- if .Values.metricsAuth.existingSecret -}}
{{- $_ := set $server "metrics_token_file" (include "cybedefend-bridge.metricsTokenFile" .) -}}
{{- end -}}
{{- $_ := set $cfg "server" $server -}}
{{- $ledger := get $cfg "ledger" | default dict -}}
{{- $_ := set $ledger "path" (printf "%s/ledger.sqlite3" (include "cybedefend-bridge.ledgerDir" .)) -}}
{{- $_ := set $cfg "ledger" $ledger -}}
{{- $ha := get $cfg "ha" | default dict -}}
{{- $_ := set $ha "enabled" .Values.ha.enabled -}}
{{- $_ := set $cfg "ha" $ha -}}
{{- if .Values.vaultServerSidecar.enabled -}}
{{- $triggers := get $cfg "triggers" | default dict -}}
{{- $file := get $triggers "audit_file" | default dict -}}
{{- $_ := set $file "path" (include "cybedefend-bridge.auditFilePath" .) -}}
{{- $_ := set $triggers "audit_file" $file -}}
{{- $_ := set $cfg "triggers" $triggers -}}
{{- end -}}
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
