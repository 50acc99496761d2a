{{/*
Chart name, overridable.
*/}}
{{- define "noisescore.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: <release>-<chart> (or fullnameOverride), truncated to 63 characters (a DNS label).
Suffixed names (-worker, -job-template) truncate the full name further, see "noisescore.suffixed".
*/}}
{{- define "noisescore.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
<fullname>-<suffix> within 63 characters: call with (list $ "worker").
*/}}
{{- define "noisescore.suffixed" -}}
{{- $root := index . 0 }}
{{- $suffix := index . 1 }}
{{- $max := sub 62 (len $suffix) | int }}
{{- printf "%s-%s" (include "noisescore.fullname" $root | trunc $max | trimSuffix "-") $suffix }}
{{- end }}

{{- define "noisescore.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Standard labels; call with (list $ "component").
*/}}
{{- define "noisescore.labels" -}}
{{- $root := index . 0 -}}
helm.sh/chart: {{ include "noisescore.chart" $root }}
{{ include "noisescore.selectorLabels" . }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
app.kubernetes.io/part-of: noisescore
{{- with $root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels; call with (list $ "component").
*/}}
{{- define "noisescore.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "noisescore.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "noisescore.server.serviceAccountName" -}}
{{- if .Values.server.serviceAccount.create }}
{{- default (include "noisescore.fullname" .) .Values.server.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.server.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "noisescore.server.image" -}}
{{- printf "%s:%s" .Values.server.image.repository (.Values.server.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "noisescore.worker.image" -}}
{{- printf "%s:%s" .Values.worker.image.repository (.Values.worker.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "noisescore.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
{{- end }}

{{/*
The bundled MinIO's full name, computed by the subchart's own helper with a context built
from this chart's values (so both always agree).
*/}}
{{- define "noisescore.minio.fullname" -}}
{{- $values := dict "nameOverride" (dig "nameOverride" "" .Values.minio) "fullnameOverride" (dig "fullnameOverride" "" .Values.minio) }}
{{- include "minio.fullname" (dict "Values" $values "Chart" (dict "Name" "minio") "Release" .Release) }}
{{- end }}

{{/*
S3 endpoint: storage.endpoint, else the bundled MinIO's Service.
*/}}
{{- define "noisescore.storage.endpoint" -}}
{{- if .Values.storage.endpoint }}
{{- .Values.storage.endpoint }}
{{- else if .Values.minio.enabled }}
{{- printf "%s.%s.svc:9000" (include "noisescore.minio.fullname" .) .Release.Namespace }}
{{- else }}
{{- fail "storage.endpoint is required when minio.enabled is false (the S3/MinIO endpoint, host:port or http(s)://host:port)" }}
{{- end }}
{{- end }}

{{/*
Secret holding the storage credentials, and its two keys.
*/}}
{{- define "noisescore.storage.secretName" -}}
{{- if .Values.storage.existingSecret }}
{{- .Values.storage.existingSecret }}
{{- else if .Values.minio.enabled }}
{{- include "noisescore.minio.fullname" . }}
{{- else }}
{{- fail "storage.existingSecret is required when minio.enabled is false (a Secret with the S3 access and secret keys, see storage.accessKeyKey/secretKeyKey)" }}
{{- end }}
{{- end }}

{{- define "noisescore.storage.accessKeyKey" -}}
{{- ternary .Values.storage.accessKeyKey "rootUser" (ne .Values.storage.existingSecret "") }}
{{- end }}

{{- define "noisescore.storage.secretKeyKey" -}}
{{- ternary .Values.storage.secretKeyKey "rootPassword" (ne .Values.storage.existingSecret "") }}
{{- end }}

{{/*
Env entries of the storage credentials (secretKeyRef only).
*/}}
{{- define "noisescore.storage.credentialsEnv" -}}
- name: NOISESCORE_S3_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "noisescore.storage.secretName" . }}
      key: {{ include "noisescore.storage.accessKeyKey" . }}
- name: NOISESCORE_S3_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "noisescore.storage.secretName" . }}
      key: {{ include "noisescore.storage.secretKeyKey" . }}
{{- end }}

{{/*
Prefect API env (URL, and the Cloud API key by reference).
*/}}
{{- define "noisescore.prefect.env" -}}
- name: PREFECT_API_URL
  value: {{ .Values.prefect.apiUrl | quote }}
{{- with .Values.prefect.apiKey.existingSecret }}
- name: PREFECT_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.prefect.apiKey.key }}
{{- end }}
{{- end }}

{{- define "noisescore.prefect.deployment" -}}
{{- printf "clean-labels/%s" .Values.prefect.deploymentName }}
{{- end }}

{{/* The active-clean flow's deployment of the same name (relabel rounds suspend it). */}}
{{- define "noisescore.prefect.activeDeployment" -}}
{{- printf "active-clean/%s" .Values.prefect.deploymentName }}
{{- end }}

{{/* The lnl-benchmark flow's deployment of the same name (started from the UI or the CLI,
never through the service). */}}
{{- define "noisescore.prefect.benchDeployment" -}}
{{- printf "lnl-benchmark/%s" .Values.prefect.deploymentName }}
{{- end }}

{{/*
"true" when a ServiceMonitor is rendered: enabled true, or auto and the CRD is served.
*/}}
{{- define "noisescore.serviceMonitor.enabled" -}}
{{- $enabled := toString .Values.metrics.serviceMonitor.enabled }}
{{- if or (eq $enabled "true") (and (eq $enabled "auto") (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1/ServiceMonitor")) }}
{{- print "true" }}
{{- end }}
{{- end }}

{{/*
"true" when callers of the gRPC API must authenticate (bearer tokens or mTLS), else "".
*/}}
{{- define "noisescore.authenticated" -}}
{{- if or .Values.auth.enabled (and .Values.tls.enabled .Values.tls.clientAuth) }}true{{ end }}
{{- end }}

{{/*
Checks that the schema cannot express across keys; included by the service Deployment.
*/}}
{{- define "noisescore.validate" -}}
{{- if and .Values.auth.enabled (not .Values.auth.existingSecret) }}
{{- fail "auth.enabled requires auth.existingSecret: the name of a Secret holding the comma-separated bearer tokens under key auth.key (default \"tokens\")" }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) }}
{{- fail "tls.enabled requires tls.existingSecret: the name of a kubernetes.io/tls Secret (tls.crt, tls.key, and ca.crt for tls.clientAuth)" }}
{{- end }}
{{- if and .Values.tls.clientAuth (not .Values.tls.enabled) }}
{{- fail "tls.clientAuth requires tls.enabled" }}
{{- end }}
{{- if not (or (include "noisescore.authenticated" .) .Values.auth.insecure) }}
{{- fail "auth.insecure=false needs auth.enabled (bearer tokens) or tls.clientAuth (mTLS): without either the service refuses to serve on the pod's address; set auth.insecure=true only where the NetworkPolicy is the access control" }}
{{- end }}
{{- if and .Values.server.podDisruptionBudget.enabled .Values.server.autoscaling.enabled }}
{{- if lt (int .Values.server.autoscaling.minReplicas) 2 }}
{{- fail "server.podDisruptionBudget with server.autoscaling needs server.autoscaling.minReplicas >= 2 (otherwise a node drain can never evict the only pod)" }}
{{- end }}
{{- end }}
{{- $_ := include "noisescore.storage.endpoint" . }}
{{- $_ = include "noisescore.storage.secretName" . }}
{{- end }}

{{/*
Env of the worker and its register init container: Prefect API, and a writable home on the
/tmp emptyDir (the root filesystem is read-only; prefect writes ~/.prefect).
*/}}
{{- define "noisescore.worker.env" -}}
{{ include "noisescore.prefect.env" . }}
- name: HOME
  value: /tmp
- name: PREFECT_HOME
  value: /tmp/prefect
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
{{- end }}
