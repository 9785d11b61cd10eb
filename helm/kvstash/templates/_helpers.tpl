{{/* Names ------------------------------------------------------------------------------------ */}}

{{- define "kvstash.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kvstash.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kvstash.gatewayName" -}}{{ include "kvstash.fullname" . }}-gateway{{- end }}
{{- define "kvstash.redisName" -}}{{ include "kvstash.fullname" . }}-redis{{- end }}
{{/* The RayCluster is named like the release; KubeRay names its head Service "<cluster>-head-svc". */}}
{{- define "kvstash.rayClusterName" -}}{{ include "kvstash.fullname" . }}{{- end }}
{{- define "kvstash.rayHeadService" -}}{{ include "kvstash.rayClusterName" . }}-head-svc{{- end }}

{{- define "kvstash.redisSecretName" -}}
{{- .Values.redis.auth.existingSecret | default (printf "%s-redis" (include "kvstash.fullname" .)) }}
{{- end }}

{{- define "kvstash.redisExternalSecretName" -}}
{{- .Values.redis.external.existingSecret | default (printf "%s-redis-url" (include "kvstash.fullname" .)) }}
{{- end }}

{{- define "kvstash.apiKeysEnabled" -}}
{{- if or .Values.apiKeys.existingSecret .Values.apiKeys.keys }}true{{ end }}
{{- end }}

{{- define "kvstash.apiKeysSecretName" -}}
{{- .Values.apiKeys.existingSecret | default (printf "%s-api-keys" (include "kvstash.fullname" .)) }}
{{- end }}

{{- define "kvstash.apiKeysFileName" -}}
{{- if .Values.apiKeys.existingSecret }}{{ .Values.apiKeys.existingSecretKey }}{{ else }}keys.toml{{ end }}
{{- end }}

{{/* Labels ----------------------------------------------------------------------------------- */}}

{{- define "kvstash.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kvstash
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: include "kvstash.selectorLabels" (list $ "gateway") */}}
{{- define "kvstash.selectorLabels" -}}
{{- $ := index . 0 -}}
app.kubernetes.io/name: {{ include "kvstash.name" $ }}
app.kubernetes.io/instance: {{ $.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* Images ----------------------------------------------------------------------------------- */}}

{{- define "kvstash.gatewayImage" -}}
{{- printf "%s:%s" .Values.gateway.image.repository (.Values.gateway.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "kvstash.rayImage" -}}
{{- $variant := ternary "gpu" "cpu" (gt (int .Values.ray.worker.gpus) 0) }}
{{- printf "%s:%s" .Values.ray.image.repository (.Values.ray.image.tag | default (printf "%s-%s" .Chart.AppVersion $variant)) }}
{{- end }}

{{/* kvstash config ---------------------------------------------------------------------------- */}}

{{/* One TOML value: strings JSON-quoted (valid TOML basic strings), whole numbers as integers. */}}
{{- define "kvstash.tomlValue" -}}
{{- if kindIs "string" . }}{{ toJson . }}
{{- else if kindIs "bool" . }}{{ . }}
{{- else if kindIs "float64" . }}{{ if eq . (floor .) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else if or (kindIs "int" .) (kindIs "int64" .) }}{{ . }}
{{- else }}{{ include "kvstash.fail" (printf "config: a value of kind %s cannot go into config.toml" (kindOf .)) }}
{{- end }}
{{- end }}

{{/* config.toml: values.config plus the keys the chart owns (the chart's win). */}}
{{- define "kvstash.configToml" -}}
{{- $owned := dict
  "ray" (dict "address" (printf "ray://%s:10001" (include "kvstash.rayHeadService" .)))
  "gateway" (dict "host" "0.0.0.0" "port" .Values.gateway.ports.grpc "metrics_port" .Values.gateway.ports.metrics)
  "http" (dict "port" .Values.gateway.ports.http) }}
{{- if include "kvstash.apiKeysEnabled" . }}
{{- $_ := set $owned.gateway "api_keys_file" (printf "/etc/kvstash/api-keys/%s" (include "kvstash.apiKeysFileName" .)) }}
{{- end }}
{{- $cfg := mustMergeOverwrite (deepCopy .Values.config) $owned }}
{{- range $i, $section := keys $cfg | sortAlpha }}
{{- if $i }}{{ "\n\n" }}{{ end }}[{{ $section }}]
{{- $values := index $cfg $section }}
{{- range $key := keys $values | sortAlpha }}
{{ $key }} = {{ include "kvstash.tomlValue" (index $values $key) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Stop rendering with a message. `fail` alone is only logged by `helm lint` (lint mode), so the
     include of a template that cannot exist makes lint fail too, carrying the same message. */}}
{{- define "kvstash.fail" -}}
{{- fail . }}
{{- include (printf "INVALID VALUES: %s" .) dict }}
{{- end }}

{{/* Cross-field checks that values.schema.json cannot express. */}}
{{- define "kvstash.validate" -}}
{{- $w := .Values.ray.worker }}
{{- if or (gt (int $w.minReplicas) (int $w.replicas)) (gt (int $w.replicas) (int $w.maxReplicas)) }}
{{- include "kvstash.fail" (printf "ray.worker: need minReplicas <= replicas <= maxReplicas, got %v <= %v <= %v" $w.minReplicas $w.replicas $w.maxReplicas) }}
{{- end }}
{{- $gpusPerActor := float64 .Values.config.ray.num_gpus_per_worker }}
{{- if and (eq (int $w.gpus) 0) (gt $gpusPerActor 0.0) }}
{{- include "kvstash.fail" (printf "config.ray.num_gpus_per_worker is %v but ray.worker.gpus is 0: worker actors would wait for a GPU forever (set it to 0 for a CPU-only group)" .Values.config.ray.num_gpus_per_worker) }}
{{- end }}
{{- $pods := ternary $w.maxReplicas $w.replicas .Values.ray.autoscaling.enabled }}
{{- if and (gt (int $w.gpus) 0) (gt (mulf $gpusPerActor .Values.config.ray.num_workers) (mulf $pods $w.gpus)) }}
{{- include "kvstash.fail" (printf "config.ray.num_workers x num_gpus_per_worker (%v x %v) needs more GPUs than the worker group offers (%v pods x %v)" .Values.config.ray.num_workers .Values.config.ray.num_gpus_per_worker $pods $w.gpus) }}
{{- end }}
{{- $s := .Values.config.session }}
{{- if gt (int $s.default_max_new_tokens) (int $s.max_new_tokens_limit) }}
{{- include "kvstash.fail" "config.session.default_max_new_tokens exceeds config.session.max_new_tokens_limit" }}
{{- end }}
{{- $a := .Values.gateway.autoscaling }}
{{- if and $a.enabled (gt (int $a.minReplicas) (int $a.maxReplicas)) }}
{{- include "kvstash.fail" (printf "gateway.autoscaling: minReplicas (%v) > maxReplicas (%v)" $a.minReplicas $a.maxReplicas) }}
{{- end }}
{{- if and (not .Values.redis.enabled) (not .Values.redis.external.url) (not .Values.redis.external.existingSecret) }}
{{- include "kvstash.fail" "redis.enabled is false: set redis.external.url or redis.external.existingSecret" }}
{{- end }}
{{- if and .Values.redis.enabled (or .Values.redis.external.url .Values.redis.external.existingSecret) }}
{{- include "kvstash.fail" "redis.external.* is set but redis.enabled is true: set redis.enabled=false to use an external Redis" }}
{{- end }}
{{- if and .Values.apiKeys.keys .Values.apiKeys.existingSecret }}
{{- include "kvstash.fail" "apiKeys: set keys or existingSecret, not both" }}
{{- end }}
{{- end }}

{{/* Probe action of the gateway: gRPC health on (port, service), or a TCP check when TLS is on (args: list port service tlsCert). */}}
{{- define "kvstash.gatewayProbe" -}}
{{- $port := index . 0 -}}
{{- if index . 2 -}}
tcpSocket:
  port: {{ $port }}
{{- else -}}
grpc:
  port: {{ $port }}
  service: {{ index . 1 | quote }}
{{- end -}}
{{- end }}
