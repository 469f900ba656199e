{{/*
The bridge container and the volumes it mounts, shared by the Deployment (mode cluster/sidecar)
and the Vault server pod snippet (vaultServerSidecar). Call with (dict "root" $ "prefix" "…"): the
prefix goes in front of every volume name, so that the bridge's volumes cannot collide with the
Vault chart's own (vault-helm names one `config`).
*/}}

{{- define "cybedefend-bridge.scheme" -}}
{{- if .Values.tls.enabled }}HTTPS{{ else }}HTTP{{ end -}}
{{- end -}}

{{- define "cybedefend-bridge.container" -}}
{{- $root := .root -}}
{{- $p := .prefix -}}
{{- $v := $root.Values -}}
name: {{ .name | default "bridge" }}
image: {{ include "cybedefend-bridge.image" $root | quote }}
imagePullPolicy: {{ $v.image.pullPolicy }}
args:
  - run
  - --config
  - /etc/cybedefend-bridge/config.yaml
  {{- range $v.extraArgs }}
  - {{ . | quote }}
  {{- end }}
env:
  - name: POD_IP
    valueFrom:
      fieldRef:
        fieldPath: status.podIP
  - name: POD_NAME
    valueFrom:
      fieldRef:
        fieldPath: metadata.name
  {{- if $v.ha.enabled }}
  # Where the other replicas forward triggers to this one when it leads (ha.advertise_address).
  - name: BRIDGE_HA_ADVERTISE_ADDRESS
    value: "{{ include "cybedefend-bridge.scheme" $root | lower }}://$(POD_IP):8080"
  {{- end }}
  {{- with $v.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
ports:
  - name: {{ $p }}http
    containerPort: 8080
    protocol: TCP
  {{- if $v.auditSocket.enabled }}
  - name: {{ $p }}audit
    containerPort: {{ $v.auditSocket.port }}
    protocol: TCP
  {{- end }}
{{- if $v.probes.startup.enabled }}
startupProbe:
  httpGet:
    path: /healthz
    port: 8080
    scheme: {{ include "cybedefend-bridge.scheme" $root }}
  periodSeconds: {{ $v.probes.startup.periodSeconds }}
  failureThreshold: {{ $v.probes.startup.failureThreshold }}
{{- end }}
livenessProbe:
  httpGet:
    path: /healthz
    port: 8080
    scheme: {{ include "cybedefend-bridge.scheme" $root }}
  {{- toYaml $v.probes.liveness | nindent 2 }}
readinessProbe:
  httpGet:
    path: /readyz
    port: 8080
    scheme: {{ include "cybedefend-bridge.scheme" $root }}
  {{- toYaml $v.probes.readiness | nindent 2 }}
securityContext:
  {{- toYaml $v.securityContext | nindent 2 }}
resources:
  {{- toYaml $v.resources | nindent 2 }}
volumeMounts:
  - name: {{ $p }}config
    mountPath: /etc/cybedefend-bridge
    readOnly: true
  - name: {{ $p }}ledger
    mountPath: {{ include "cybedefend-bridge.ledgerDir" $root }}
  - name: {{ $p }}tmp
    mountPath: /tmp
  {{- if $v.cybedefend.existingSecret }}
  - name: {{ $p }}cybedefend-credential
    mountPath: /var/run/secrets/cybedefend-bridge/cybedefend
    readOnly: true
  {{- end }}
  {{- if $v.webhook.existingSecret }}
  - name: {{ $p }}webhook-token
    mountPath: /var/run/secrets/cybedefend-bridge/webhook
    readOnly: true
  {{- end }}
  {{- if $v.metricsAuth.existingSecret }}
  - name: {{ $p }}metrics-token
    mountPath: /var/run/secrets/cybedefend-bridge/metrics
    readOnly: true
  {{- end }}
  {{- if $v.tls.enabled }}
  - name: {{ $p }}tls
    mountPath: /var/run/secrets/cybedefend-bridge/tls
    readOnly: true
  {{- end }}
  {{- if or $v.vault.ca.secretName $v.vault.ca.configMapName }}
  - name: {{ $p }}vault-ca
    mountPath: /etc/cybedefend-bridge-vault-ca
    readOnly: true
  {{- end }}
  {{- if $v.vaultServerSidecar.enabled }}
  # The Vault chart's audit volume: Vault writes its file audit device there, the bridge follows it.
  - name: {{ $v.vaultServerSidecar.auditVolumeName }}
    mountPath: {{ $v.vaultServerSidecar.auditMountPath }}
    readOnly: true
  {{- end }}
  {{- with $v.extraVolumeMounts }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end -}}

{{- define "cybedefend-bridge.volumes" -}}
{{- $root := .root -}}
{{- $p := .prefix -}}
{{- $v := $root.Values -}}
- name: {{ $p }}config
  configMap:
    name: {{ include "cybedefend-bridge.fullname" $root }}
- name: {{ $p }}ledger
  {{- if $v.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ default (include "cybedefend-bridge.fullname" $root) $v.persistence.existingClaim }}
  {{- else }}
  emptyDir: {}
  {{- end }}
- name: {{ $p }}tmp
  emptyDir:
    sizeLimit: {{ $v.tmpSizeLimit }}
{{- if $v.cybedefend.existingSecret }}
- name: {{ $p }}cybedefend-credential
  secret:
    secretName: {{ $v.cybedefend.existingSecret }}
    defaultMode: 0440
    items:
      - key: {{ $v.cybedefend.secretKey }}
        path: {{ $v.cybedefend.secretKey }}
{{- end }}
{{- if $v.webhook.existingSecret }}
- name: {{ $p }}webhook-token
  secret:
    secretName: {{ $v.webhook.existingSecret }}
    defaultMode: 0440
    items:
      - key: {{ $v.webhook.secretKey }}
        path: {{ $v.webhook.secretKey }}
{{- end }}
{{- if $v.metricsAuth.existingSecret }}
- name: {{ $p }}metrics-token
  secret:
    secretName: {{ $v.metricsAuth.existingSecret }}
    defaultMode: 0440
    items:
      - key: {{ $v.metricsAuth.secretKey }}
        path: {{ $v.metricsAuth.secretKey }}
{{- end }}
{{- if $v.tls.enabled }}
- name: {{ $p }}tls
  secret:
    secretName: {{ $v.tls.existingSecret }}
    defaultMode: 0440
    items:
      - key: {{ $v.tls.certKey }}
        path: {{ $v.tls.certKey }}
      - key: {{ $v.tls.keyKey }}
        path: {{ $v.tls.keyKey }}
{{- end }}
{{- if $v.vault.ca.secretName }}
- name: {{ $p }}vault-ca
  secret:
    secretName: {{ $v.vault.ca.secretName }}
    items:
      - key: {{ $v.vault.ca.key }}
        path: {{ $v.vault.ca.key }}
{{- else if $v.vault.ca.configMapName }}
- name: {{ $p }}vault-ca
  configMap:
    name: {{ $v.vault.ca.configMapName }}
    items:
      - key: {{ $v.vault.ca.key }}
        path: {{ $v.vault.ca.key }}
{{- end }}
{{- with $v.extraVolumes }}
{{- toYaml . | nindent 0 }}
{{- end }}
{{- end -}}
