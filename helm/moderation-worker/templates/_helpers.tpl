{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "mw.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Fully qualified app name. Kept to 40 characters: KubeRay derives longer names from it
(<name>-head-svc, <name>-serve-svc, <name>-<hash>-gpu-worker-...) that must stay DNS labels.
*/}}
{{- define "mw.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "mw.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "mw.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "mw.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mw.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "mw.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion .Values.image.variant) -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{- define "mw.secretName" -}}
{{- .Values.secrets.existingSecret | default (printf "%s-secrets" (include "mw.fullname" .)) -}}
{{- end -}}

{{- define "mw.tlsSecretName" -}}
{{- .Values.kafkaTls.existingSecret | default (printf "%s-kafka-tls" (include "mw.fullname" .)) -}}
{{- end -}}

{{- define "mw.configDir" -}}/etc/moderation-worker{{- end -}}
{{- define "mw.configPath" -}}{{ include "mw.configDir" . }}/config.yaml{{- end -}}
{{- define "mw.tlsDir" -}}{{ include "mw.configDir" . }}/kafka-tls{{- end -}}

{{/* Ray Client address of the RayService's head (KubeRay keeps <rayservice>-head-svc across upgrades). */}}
{{- define "mw.opsPort" -}}
{{- $ops := get .Values.config "ops" | default dict -}}
{{- if hasKey $ops "port" }}{{ get $ops "port" | int }}{{ else }}9400{{ end -}}
{{- end -}}

{{- define "mw.rayClientAddress" -}}
{{- printf "ray://%s-head-svc.%s.svc:10001" (include "mw.fullname" .) .Release.Namespace -}}
{{- end -}}

{{/*
The worker's config as YAML: .Values.config plus what the chart knows (ray.address, ray.num_workers,
kafka TLS file paths), each only when the user did not set it.
*/}}
{{- define "mw.workerConfig" -}}
{{- $cfg := deepCopy .Values.config -}}
{{- $ray := get $cfg "ray" | default dict -}}
{{- if not (hasKey $ray "address") -}}
{{- $_ := set $ray "address" (include "mw.rayClientAddress" .) -}}
{{- end -}}
{{- if not (hasKey $ray "num_workers") -}}
{{- $_ := set $ray "num_workers" (int .Values.stream.actors) -}}
{{- end -}}
{{- $_ := set $cfg "ray" $ray -}}
{{- if .Values.kafkaTls.enabled -}}
{{- $kafka := get $cfg "kafka" | default dict -}}
{{- $dir := include "mw.tlsDir" . -}}
{{- if not (hasKey $kafka "ssl_cafile") }}{{ $_ := set $kafka "ssl_cafile" (printf "%s/ca.crt" $dir) }}{{ end -}}
{{- if .Values.kafkaTls.mutual -}}
{{- if not (hasKey $kafka "ssl_certfile") }}{{ $_ := set $kafka "ssl_certfile" (printf "%s/tls.crt" $dir) }}{{ end -}}
{{- if not (hasKey $kafka "ssl_keyfile") }}{{ $_ := set $kafka "ssl_keyfile" (printf "%s/tls.key" $dir) }}{{ end -}}
{{- end -}}
{{- $_ := set $cfg "kafka" $kafka -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* Environment shared by every container: config location and secrets (each key optional). */}}
{{- define "mw.env" -}}
- name: MW_CONFIG
  value: {{ include "mw.configPath" . }}
- name: MW_KAFKA__SASL_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ include "mw.secretName" . }}, key: kafka-sasl-password, optional: true}
- name: MW_REDIS__PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ include "mw.secretName" . }}, key: redis-password, optional: true}
- name: MW_MODEL__HF_TOKEN
  valueFrom:
    secretKeyRef: {name: {{ include "mw.secretName" . }}, key: hf-token, optional: true}
{{- range $name, $_ := .Values.apiKeys.keys }}
- name: MODERATION_API_KEY_{{ $name | upper | replace "-" "_" }}
  valueFrom:
    secretKeyRef: {name: {{ include "mw.apiKeysSecretName" $ }}, key: {{ $name }}, optional: true}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "mw.configVolumeMounts" -}}
- name: worker-config
  mountPath: {{ include "mw.configDir" . }}/config.yaml
  subPath: config.yaml
  readOnly: true
{{- if .Values.kafkaTls.enabled }}
- name: kafka-tls
  mountPath: {{ include "mw.tlsDir" . }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "mw.configVolumes" -}}
- name: worker-config
  configMap:
    name: {{ include "mw.fullname" . }}-config
{{- if .Values.kafkaTls.enabled }}
- name: kafka-tls
  secret:
    secretName: {{ include "mw.tlsSecretName" . }}
    defaultMode: 0400
{{- end }}
{{- end -}}

{{/* The model weights volume; callers include it only when modelWeights.source is not "none". */}}
{{- define "mw.weightsVolume" -}}
- name: model-weights
{{- if eq .Values.modelWeights.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ .Values.modelWeights.pvc.existingClaim | default (printf "%s-weights" (include "mw.fullname" .)) }}
    readOnly: true
{{- else }}
  hostPath:
    path: {{ .Values.modelWeights.hostPath.path }}
    type: {{ .Values.modelWeights.hostPath.type }}
{{- end }}
{{- end -}}

{{- define "mw.weightsVolumeMount" -}}
- name: model-weights
  mountPath: {{ .Values.modelWeights.mountPath }}
  readOnly: true
{{- end -}}

{{/*
Fail early when the GPU group cannot hold the stream actors and the Serve replicas
(pods would stay Pending and actors unschedulable without any error).
*/}}
{{- define "mw.checkGpuCapacity" -}}
{{- $cfg := .Values.config -}}
{{- $ray := get $cfg "ray" | default dict -}}
{{- $serveCfg := get $cfg "serve" | default dict -}}
{{- $perActor := 1.0 -}}
{{- if hasKey $ray "num_gpus_per_worker" }}{{ $perActor = float64 (get $ray "num_gpus_per_worker") }}{{ end -}}
{{- $actors := float64 (get $ray "num_workers" | default .Values.stream.actors) -}}
{{- $need := 0.0 -}}
{{- if .Values.stream.enabled }}{{ $need = mulf $actors $perActor }}{{ end -}}
{{- if .Values.serve.enabled -}}
{{- $need = addf $need (mulf (float64 (get $serveCfg "num_replicas" | default 1)) (float64 (get $serveCfg "num_gpus" | default 0))) -}}
{{- end -}}
{{- $have := mulf (float64 .Values.gpuWorkers.replicas) (float64 .Values.gpuWorkers.gpusPerPod) -}}
{{- if gt $need $have -}}
{{- fail (printf "GPU capacity: stream actors and Serve replicas need %v GPUs but gpuWorkers.replicas * gpuWorkers.gpusPerPod = %v" $need $have) -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the HTTP endpoints' API keys (one key per apiKeys.keys name). */}}
{{- define "mw.apiKeysSecretName" -}}
{{- .Values.apiKeys.existingSecret | default (printf "%s-api-keys" (include "mw.fullname" .)) -}}
{{- end -}}
