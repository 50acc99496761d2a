{{/*
Name of the chart, overridable.
*/}}
{{- define "minio.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: <release>-minio (or fullnameOverride), truncated to 52 characters: the
StatefulSet's pods carry a controller-revision-hash label "<name>-<10-char hash>" that must
fit the 63 characters of a label value. The parent chart calls this with a context built from its own values
(noisescore.minio.fullname), so it reads only .Values.nameOverride/.fullnameOverride,
.Chart.Name and .Release.Name.
*/}}
{{- define "minio.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The Secret holding MINIO_ROOT_USER / MINIO_ROOT_PASSWORD (keys rootUser, rootPassword).
*/}}
{{- define "minio.headlessName" -}}
{{- printf "%s-headless" (include "minio.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}

{{- define "minio.secretName" -}}
{{- include "minio.fullname" . }}
{{- end }}

{{- define "minio.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "minio.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: noisescore
{{- end }}

{{- define "minio.selectorLabels" -}}
app.kubernetes.io/name: {{ include "minio.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: object-storage
{{- end }}
