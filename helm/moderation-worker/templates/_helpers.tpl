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
{{- define "mw.configMountDir" -}}{{ include "mw.configDir" . }}/config{{- end -}}
{{- define "mw.configPath" -}}{{ include "mw.configMountDir" . }}/config.yaml{{- end -}}
{{- define "mw.tlsDir" -}}{{ include "mw.configDir" . }}/kafka-tls{{- end -}}

{{- define "mw.opsPort" -}}
{{- $ops := get .Values.config "ops" | default dict -}}
{{- if hasKey $ops "port" }}{{ get $ops "port" | int }}{{ else }}9400{{ end -}}
{{- end -}}

{{/* The stream's RayCluster. Its head service exists as soon as the head runs (no Serve coupling). */}}
{{- define "mw.streamClusterName" -}}{{ include "mw.fullname" . }}-stream{{- end -}}

{{- define "mw.rayClientAddress" -}}
{{- printf "ray://%s-head-svc.%s.svc:10001" (include "mw.streamClusterName" .) .Release.Namespace -}}
{{- end -}}

{{- define "mw.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "mw.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
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
{{- with .Values.stream.autoscaling -}}
{{- if .enabled -}}
{{- if not (hasKey $ray "autoscale") }}{{ $_ := set $ray "autoscale" true }}{{ end -}}
{{- if not (hasKey $ray "min_workers") }}{{ $_ := set $ray "min_workers" (int .minActors) }}{{ end -}}
{{- if not (hasKey $ray "max_workers") }}{{ $_ := set $ray "max_workers" (int .maxActors) }}{{ end -}}
{{- if not (hasKey $ray "lag_per_worker") }}{{ $_ := set $ray "lag_per_worker" (int .lagPerActor) }}{{ end -}}
{{- end -}}
{{- end -}}
{{- $_ := set $cfg "ray" $ray -}}
{{- if .Values.pools -}}
{{- $pools := dict -}}
{{- range .Values.pools -}}
{{- $_ := set $pools .name (dict "models" .models "dead_letters" (default false .deadLetters) "num_workers" (int .actors) "num_gpus_per_worker" (default 1 .gpusPerActor)) -}}
{{- end -}}
{{- $_ := set $cfg "pools" $pools -}}
{{- end -}}
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
- name: MW_KAFKA__SSL_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ include "mw.secretName" . }}, key: kafka-ssl-password, optional: true}
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
  mountPath: {{ include "mw.configMountDir" . }}
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
Fail early when a GPU group cannot hold its actors or replicas (pods would stay Pending and actors
unschedulable without any error). Each cluster has its own group.
*/}}
{{- define "mw.checkGpuCapacity" -}}
{{- $cfg := .Values.config -}}
{{- $ray := get $cfg "ray" | default dict -}}
{{- $serveCfg := get $cfg "serve" | default dict -}}
{{- if .Values.stream.enabled -}}
{{- $perActor := 1.0 -}}
{{- if hasKey $ray "num_gpus_per_worker" }}{{ $perActor = float64 (get $ray "num_gpus_per_worker") }}{{ end -}}
{{- $actors := float64 (get $ray "num_workers" | default .Values.stream.actors) -}}
{{- if .Values.stream.autoscaling.enabled }}{{ $actors = float64 .Values.stream.autoscaling.maxActors }}{{ end -}}
{{- $need := mulf $actors $perActor -}}
{{- $have := mulf (float64 .Values.gpuWorkers.maxReplicas) (float64 .Values.gpuWorkers.gpusPerPod) -}}
{{- if gt $need $have -}}
{{- fail (printf "GPU capacity: the stream's actors need %v GPUs but gpuWorkers.maxReplicas * gpuWorkers.gpusPerPod = %v" $need $have) -}}
{{- end -}}
{{- end -}}
{{- if .Values.serve.enabled -}}
{{- $group := include "mw.serveGroup" . | fromYaml -}}
{{- $need := mulf (float64 (get $serveCfg "num_replicas" | default 1)) (float64 (get $serveCfg "num_gpus" | default 0)) -}}
{{- $have := mulf (float64 $group.maxReplicas) (float64 $group.gpusPerPod) -}}
{{- if gt $need $have -}}
{{- fail (printf "GPU capacity: Serve replicas need %v GPUs but serve.gpuWorkers maxReplicas * gpusPerPod = %v" $need $have) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The Serve cluster's worker group: gpuWorkers with serve.gpuWorkers on top. */}}
{{- define "mw.serveGroup" -}}
{{- toYaml (mergeOverwrite (deepCopy .Values.gpuWorkers) (deepCopy .Values.serve.gpuWorkers)) -}}
{{- end -}}

{{/*
Pod template annotations that roll every pod when the worker config or the chart's Secrets change
(an existingSecret only by name: its content is not known at render time).
*/}}
{{- define "mw.checksums" -}}
checksum/config: {{ include "mw.workerConfig" . | sha256sum }}
checksum/secret: {{ include (print .Template.BasePath "/secret.yaml") . | sha256sum }}
{{- end -}}

{{/* Ray pod resources: requests = limits (KubeRay sizes Ray from limits), plus GPUs when asked. */}}
{{- define "mw.rayResources" -}}
{{- $resources := .resources | default dict -}}
{{- $limits := deepCopy (get $resources "limits" | default dict) -}}
{{- with get $resources "requests" -}}
{{- if not (deepEqual . $limits) -}}
{{- fail (printf "%s.resources: give only limits (requests are rendered equal to them; KubeRay sizes Ray from limits)" $.where) -}}
{{- end -}}
{{- end -}}
{{- if gt (int .gpus) 0 -}}
{{- $_ := set $limits .gpuResourceName (int .gpus) -}}
{{- end -}}
{{- toYaml (dict "requests" $limits "limits" $limits) -}}
{{- end -}}

{{/*
One Ray pod template. Context: dict root, cluster (stream|serve), component (ray-head|ray-gpu-worker),
container, group (values of the group: resources, placement, shmSize, ...), gpus, ports.
*/}}
{{- define "mw.rayPodTemplate" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
metadata:
  labels:
    {{- include "mw.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
    moderation-worker/ray-cluster: {{ .cluster }}
  annotations:
    {{- include "mw.checksums" $root | nindent 4 }}
spec:
  serviceAccountName: {{ include "mw.serviceAccountName" $root }}
  automountServiceAccountToken: {{ $v.serviceAccount.automountServiceAccountToken }}
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $v.podSecurityContext | nindent 4 }}
  containers:
    - name: {{ .container }}
      image: {{ include "mw.image" $root }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      securityContext:
        {{- toYaml $v.containerSecurityContext | nindent 8 }}
      ports:
        {{- toYaml .ports | nindent 8 }}
      env:
        {{- include "mw.env" $root | nindent 8 }}
      resources:
        {{- include "mw.rayResources" (dict "resources" .group.resources "gpus" .gpus "gpuResourceName" $v.gpuWorkers.gpuResourceName "where" .where) | nindent 8 }}
      volumeMounts:
        {{- include "mw.configVolumeMounts" $root | nindent 8 }}
        - name: ray-tmp
          mountPath: /tmp/ray
        {{- if and (eq .component "ray-gpu-worker") (ne $v.modelWeights.source "none") }}
        {{- include "mw.weightsVolumeMount" $root | nindent 8 }}
        {{- end }}
        {{- if .group.shmSize }}
        - name: dshm
          mountPath: /dev/shm
        {{- end }}
  volumes:
    {{- include "mw.configVolumes" $root | nindent 4 }}
    - name: ray-tmp
      emptyDir:
        sizeLimit: {{ $v.rayTmp.sizeLimit }}
    {{- if and (eq .component "ray-gpu-worker") (ne $v.modelWeights.source "none") }}
    {{- include "mw.weightsVolume" $root | nindent 4 }}
    {{- end }}
    {{- if .group.shmSize }}
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ .group.shmSize }}
    {{- end }}
  {{- with .group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if and (eq .component "ray-gpu-worker") .group.topologySpread .group.topologySpread.enabled }}
  topologySpreadConstraints:
    - maxSkew: {{ .group.topologySpread.maxSkew }}
      topologyKey: {{ .group.topologySpread.topologyKey }}
      whenUnsatisfiable: {{ .group.topologySpread.whenUnsatisfiable }}
      labelSelector:
        matchLabels:
          {{- include "mw.selectorLabels" $root | nindent 10 }}
          app.kubernetes.io/component: {{ .component }}
          moderation-worker/ray-cluster: {{ .cluster }}
  {{- end }}
{{- end -}}

{{/* rayClusterConfig / RayCluster spec shared by both clusters. Context: dict root, cluster, group. */}}
{{- define "mw.rayClusterSpec" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
rayVersion: {{ $v.rayVersion | quote }}
{{- if $v.gcsFaultTolerance.enabled }}
gcsFaultToleranceOptions:
  redisAddress: {{ required "gcsFaultTolerance.redisAddress is required when gcsFaultTolerance.enabled" $v.gcsFaultTolerance.redisAddress | quote }}
  {{- with $v.gcsFaultTolerance.externalStorageNamespace }}
  externalStorageNamespace: {{ printf "%s-%s" . $.cluster | quote }}
  {{- end }}
  redisPassword:
    valueFrom:
      secretKeyRef: {name: {{ include "mw.secretName" $root }}, key: gcs-redis-password, optional: true}
{{- end }}
{{- if .autoscaling }}
enableInTreeAutoscaling: true
autoscalerOptions:
  upscalingMode: Default
  idleTimeoutSeconds: {{ $v.stream.autoscaling.idleTimeoutSeconds }}
  securityContext:
    {{- toYaml $v.containerSecurityContext | nindent 4 }}
{{- end }}
headGroupSpec:
  rayStartParams:
    {{- range $k, $val := $v.head.rayStartParams }}
    {{ $k }}: {{ $val | quote }}
    {{- end }}
  template:
    {{- include "mw.rayPodTemplate" (dict "root" $root "cluster" .cluster "component" "ray-head" "container" "ray-head" "group" $v.head "gpus" 0 "where" "head" "ports" (list (dict "containerPort" 6379 "name" "gcs-server") (dict "containerPort" 8265 "name" "dashboard") (dict "containerPort" 10001 "name" "client") (dict "containerPort" 8000 "name" "serve") (dict "containerPort" 8080 "name" "metrics"))) | nindent 4 }}
workerGroupSpecs:
  - groupName: {{ .group.groupName }}
    replicas: {{ .group.replicas }}
    minReplicas: {{ .group.minReplicas }}
    maxReplicas: {{ .group.maxReplicas }}
    rayStartParams:
      {{- range $k, $val := .group.rayStartParams }}
      {{ $k }}: {{ $val | quote }}
      {{- end }}
    template:
      {{- include "mw.rayPodTemplate" (dict "root" $root "cluster" .cluster "component" "ray-gpu-worker" "container" "ray-worker" "group" .group "gpus" .group.gpusPerPod "where" .where "ports" (list (dict "containerPort" 8080 "name" "metrics"))) | nindent 6 }}
{{- end -}}

{{/* The Secret holding the HTTP endpoints' API keys (one key per apiKeys.keys name). */}}
{{- define "mw.apiKeysSecretName" -}}
{{- .Values.apiKeys.existingSecret | default (printf "%s-api-keys" (include "mw.fullname" .)) -}}
{{- end -}}
