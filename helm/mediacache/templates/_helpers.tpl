{{/* Chart name, truncated for label values. */}}
{{- define "mediacache.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the prefix of every resource of this release. */}}
{{- define "mediacache.fullname" -}}
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

{{/* Name of the managed Redis StatefulSet and its headless Service. */}}
{{- define "mediacache.redisName" -}}
{{- printf "%s-redis" (include "mediacache.fullname" . | trunc 56 | trimSuffix "-") }}
{{- end }}

{{- define "mediacache.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mediacache.labels" -}}
helm.sh/chart: {{ include "mediacache.chart" . }}
{{ include "mediacache.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "mediacache.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mediacache.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: cache
{{- end }}

{{- define "mediacache.redisLabels" -}}
helm.sh/chart: {{ include "mediacache.chart" . }}
{{ include "mediacache.redisSelectorLabels" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "mediacache.redisSelectorLabels" -}}
app.kubernetes.io/name: {{ include "mediacache.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis-shard
{{- end }}

{{- define "mediacache.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mediacache.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "mediacache.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Where the pods see the config directory and the Secrets. */}}
{{- define "mediacache.configDir" -}}/etc/mediacache/config{{- end }}
{{- define "mediacache.secretsDir" -}}/etc/mediacache/secrets{{- end }}

{{/*
The settings that only take effect after a restart. The Deployment carries a checksum of this
text alone, so that changing one of them rolls the pods and editing shards never does.
*/}}
{{- define "mediacache.restartConfig" -}}
listen: "0.0.0.0:{{ .Values.service.grpcPort }}"
metrics_listen: "0.0.0.0:{{ .Values.service.metricsPort }}"
shutdown_grace: {{ .Values.shutdownGraceSeconds }}s
{{ omit .Values.config "failover" "redis" | toYaml }}
{{- $secrets := include "mediacache.secretsDir" . }}
{{- if or .Values.auth.existingSecret .Values.auth.readOnlySecret }}
auth:
  {{- if .Values.auth.existingSecret }}
  token_files:
    {{- range .Values.auth.tokenKeys }}
    - {{ printf "%s/tokens/%s" $secrets . | quote }}
    {{- end }}
  {{- end }}
  {{- if .Values.auth.readOnlySecret }}
  read_only_token_files:
    {{- range .Values.auth.readOnlyTokenKeys }}
    - {{ printf "%s/read-only-tokens/%s" $secrets . | quote }}
    {{- end }}
  {{- end }}
{{- end }}
{{- if .Values.tls.existingSecret }}
tls:
  cert_file: {{ printf "%s/tls/tls.crt" $secrets | quote }}
  key_file: {{ printf "%s/tls/tls.key" $secrets | quote }}
  {{- if .Values.tls.clientCaKey }}
  client_ca_file: {{ printf "%s/tls/%s" $secrets .Values.tls.clientCaKey | quote }}
  {{- end }}
{{- end }}
{{- end }}

{{/* The shard list: managed shards first, then external ones. Names must be unique. */}}
{{- define "mediacache.shards" -}}
{{- $names := dict }}
{{- $shards := list }}
{{- if .Values.redisShards.enabled }}
{{- $redis := include "mediacache.redisName" . }}
{{- range $i := until (int .Values.redisShards.count) }}
{{- $name := printf "%s-%d" $.Values.redisShards.namePrefix $i }}
{{- $url := printf "redis://%s-%d.%s.%s.svc.%s:6379" $redis $i $redis $.Release.Namespace $.Values.clusterDomain }}
{{- $shards = append $shards (dict "name" $name "url" $url "weight" 1) }}
{{- end }}
{{- end }}
{{- range .Values.shards }}
{{- $shards = append $shards (dict "name" .name "url" .url "weight" (default 1 .weight)) }}
{{- end }}
{{- range $shards }}
{{- if hasKey $names .name }}
{{- fail (printf "shards: the name %q is used twice (managed shards are named %s-0, %s-1, ...)" .name $.Values.redisShards.namePrefix $.Values.redisShards.namePrefix) }}
{{- end }}
{{- $_ := set $names .name true }}
{{- end }}
{{- if $shards }}
shards:
{{- range $shards }}
  - name: {{ .name | quote }}
    url: {{ .url | quote }}
    weight: {{ .weight }}
{{- end }}
{{- else }}
shards: []
{{- end }}
{{- end }}

{{/* Settings applied live: the shard list, failover and the Redis client. */}}
{{- define "mediacache.liveConfig" -}}
{{ include "mediacache.shards" . }}
failover: {{ .Values.config.failover }}
{{- $redis := deepCopy .Values.config.redis }}
{{- if .Values.redisAuth.existingSecret }}
{{- $_ := set $redis "password_file" (printf "%s/redis/password" (include "mediacache.secretsDir" .)) }}
{{- if .Values.redisAuth.username }}
{{- $_ := set $redis "username" .Values.redisAuth.username }}
{{- end }}
{{- end }}
{{- if .Values.redisTls.caSecret }}
{{- $_ := set $redis "tls_ca_file" (printf "%s/redis-ca/%s" (include "mediacache.secretsDir" .) .Values.redisTls.caKey) }}
{{- end }}
redis:
  {{- toYaml $redis | nindent 2 }}
{{- end }}

{{/* Topology spread entries, each given the pods' labels when it names none. */}}
{{- define "mediacache.topologySpread" -}}
{{- $out := list }}
{{- range .constraints }}
{{- $c := deepCopy . }}
{{- if not (hasKey $c "labelSelector") }}
{{- $_ := set $c "labelSelector" (dict "matchLabels" $.labels) }}
{{- end }}
{{- $out = append $out $c }}
{{- end }}
{{- toYaml $out }}
{{- end }}
