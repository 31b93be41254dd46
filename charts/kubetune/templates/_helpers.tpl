{{/* Names ------------------------------------------------------------------------------ */}}

{{- define "kubetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kubetune.fullname" -}}
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

{{/* The operator's objects: "<fullname>-operator", kept a DNS label. */}}
{{- define "kubetune.operatorName" -}}
{{- printf "%s-operator" (include "kubetune.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}

{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubetune.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kubetune.metricsServiceName" -}}
{{- printf "%s-metrics" (include "kubetune.operatorName" .) }}
{{- end }}

{{/* Labels ----------------------------------------------------------------------------- */}}

{{- define "kubetune.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetune
{{- end }}

{{/* The operator pod's selector; "component" keeps trainer pods (component: trainer) out. */}}
{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "kubetune.operatorLabels" -}}
{{ include "kubetune.labels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Images ----------------------------------------------------------------------------- */}}

{{/* registry/repository, then @digest when set, else :tag (default: the appVersion). */}}
{{- define "kubetune.imageRef" -}}
{{- $tag := default .appVersion .image.tag | toString }}
{{- $name := .image.repository }}
{{- with .image.registry }}{{ $name = printf "%s/%s" . $name }}{{ end }}
{{- if .image.digest }}
{{- printf "%s@%s" $name .image.digest }}
{{- else }}
{{- printf "%s:%s" $name $tag }}
{{- end }}
{{- end }}

{{- define "kubetune.operatorImage" -}}
{{- include "kubetune.imageRef" (dict "image" .Values.image "appVersion" .Chart.AppVersion) }}
{{- end }}

{{- define "kubetune.trainerImage" -}}
{{- include "kubetune.imageRef" (dict "image" .Values.trainer.image "appVersion" .Chart.AppVersion) }}
{{- end }}

{{/* Modes ------------------------------------------------------------------------------ */}}

{{/* "true" when the operator watches all namespaces. */}}
{{- define "kubetune.clusterwide" -}}
{{- if not .Values.watchNamespaces }}true{{ end }}
{{- end }}

{{/* "true" with more than one replica: kopf peering coordinates them. */}}
{{- define "kubetune.peering" -}}
{{- if gt (int .Values.replicas) 1 }}true{{ end }}
{{- end }}

{{- define "kubetune.peeringName" -}}
{{- include "kubetune.fullname" . }}
{{- end }}

{{/* The admin policy as the operator reads it (KUBETUNE_POLICY): empty strings dropped. */}}
{{- define "kubetune.policyJson" -}}
{{- $policy := deepCopy .Values.policy }}
{{- if not $policy.defaultQueue }}{{- $_ := unset $policy "defaultQueue" }}{{- end }}
{{- toJson $policy }}
{{- end }}

{{/* NetworkPolicyPeers that may scrape trainer ranks: the operator pods, then the admin's. */}}
{{- define "kubetune.trainerMetricsFrom" -}}
{{- $operator := dict "namespaceSelector" (dict "matchLabels" (dict "kubernetes.io/metadata.name" .Release.Namespace)) "podSelector" (dict "matchLabels" (fromYaml (include "kubetune.selectorLabels" .))) }}
{{- toJson (prepend .Values.trainer.networkPolicy.metricsFrom $operator) }}
{{- end }}
