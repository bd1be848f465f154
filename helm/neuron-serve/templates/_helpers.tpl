{{/* vim: set filetype=mustache: */}}

{{/* Chart name (nameOverride wins). */}}
{{- define "neuron-serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name, at most 40 characters so that "-exec-headless" and Job suffixes fit 63. */}}
{{- define "neuron-serve.fullname" -}}
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

{{/* Chart name and version, for the helm.sh/chart label. */}}
{{- define "neuron-serve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Standard labels. Call with (dict "ctx" $ "component" "exec"). */}}
{{- define "neuron-serve.labels" -}}
helm.sh/chart: {{ include "neuron-serve.chart" .ctx }}
{{ include "neuron-serve.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: neuron-serve
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels (immutable on Deployments: never add to these). */}}
{{- define "neuron-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "neuron-serve.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end }}

{{/* ServiceAccount name. */}}
{{- define "neuron-serve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "neuron-serve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Name of the ConfigMap with the serving config. */}}
{{- define "neuron-serve.configMapName" -}}
{{- printf "%s-config" (include "neuron-serve.fullname" .) }}
{{- end }}

{{/* "repository:tag" with the tag defaulting to the chart's appVersion. Call with (dict "ctx" $ "image" ...). */}}
{{- define "neuron-serve.image" -}}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) }}
{{- end }}

{{/* Image of the exec pods: the one of the accelerator profile. */}}
{{- define "neuron-serve.exec.image" -}}
{{- include "neuron-serve.image" (dict "ctx" . "image" (get .Values.exec.image .Values.exec.profile)) }}
{{- end }}

{{/* Image of the prepare Job: its own, else the prep image. */}}
{{- define "neuron-serve.prepareJob.image" -}}
{{- $img := .Values.prepareJob.image }}
{{- if $img.repository }}
{{- include "neuron-serve.image" (dict "ctx" . "image" $img) }}
{{- else }}
{{- include "neuron-serve.image" (dict "ctx" . "image" .Values.prep.image) }}
{{- end }}
{{- end }}

{{/* Mount point of the store volume, and the store URI (default: a file:// store on that volume). */}}
{{- define "neuron-serve.storeMountPath" -}}/var/lib/neuron-serve/store{{- end }}

{{- define "neuron-serve.storeUri" -}}
{{- default (printf "file://%s" (include "neuron-serve.storeMountPath" .)) .Values.store.uri }}
{{- end }}

{{/* "true" when the store lives on the mounted volume (file:// store). */}}
{{- define "neuron-serve.storeIsFile" -}}
{{- if hasPrefix "file://" (include "neuron-serve.storeUri" .) }}true{{ end }}
{{- end }}

{{/* --device of exec-server for the profile. */}}
{{- define "neuron-serve.exec.device" -}}
{{- get (dict "neuron" "neuron" "gpu" "cuda" "cpu" "cpu") .Values.exec.profile }}
{{- end }}

{{/* Accelerator count of the profile: explicit, else derived from tp. Empty for cpu. */}}
{{- define "neuron-serve.exec.acceleratorCount" -}}
{{- $p := .Values.exec.profile }}
{{- $tp := int .Values.exec.tp }}
{{- if ne $p "cpu" }}
{{- $acc := get .Values.exec.accelerators $p }}
{{- if not (kindIs "invalid" $acc.count) }}
{{- $acc.count }}
{{- else if and (eq $p "neuron") (eq $acc.resourceName "aws.amazon.com/neuron") }}
{{- $cores := int $acc.coresPerDevice }}
{{- div (add $tp (sub $cores 1)) $cores }}
{{- else }}
{{- $tp }}
{{- end }}
{{- end }}
{{- end }}

{{/* "true" when /dev/shm is mounted on the exec pods. */}}
{{- define "neuron-serve.exec.shmEnabled" -}}
{{- $e := .Values.exec.sharedMemory.enabled }}
{{- if eq (toString $e) "auto" }}
{{- if gt (int .Values.exec.tp) 1 }}true{{ end }}
{{- else if $e }}true{{ end }}
{{- end }}

{{/*
terminationGracePeriodSeconds: explicit (checked to cover preStop sleep + drain), else
preStop sleep + drain + 15 s for the process to exit. Call with the component's values.
*/}}
{{- define "neuron-serve.terminationGracePeriod" -}}
{{- $need := add (int .preStopSleepSeconds) (int .drainTimeoutSeconds) }}
{{- if kindIs "invalid" .terminationGracePeriodSeconds }}
{{- add $need 15 }}
{{- else if lt (int .terminationGracePeriodSeconds) (int $need) }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be >= preStopSleepSeconds + drainTimeoutSeconds (%v)" .terminationGracePeriodSeconds $need) }}
{{- else }}
{{- int .terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/* Port the kubelet probes: the gRPC port, or the plaintext health port when TLS is on. */}}
{{- define "neuron-serve.probePort" -}}
{{- if .Values.tls.enabled }}{{ .Values.tls.healthPort }}{{ else }}{{ .Values.server.grpcPort }}{{ end }}
{{- end }}

{{/*
Native gRPC probes on grpc.health.v1: startup and readiness on the service name (model loaded, not
draining), liveness on "" (the process; stays SERVING while draining).
Call with (dict "ctx" $ "probes" .Values.exec.probes "service" "neuronserve.exec.v1.ExecService").
*/}}
{{- define "neuron-serve.probes" -}}
{{- $port := include "neuron-serve.probePort" .ctx | int -}}
startupProbe:
  grpc:
    port: {{ $port }}
    service: {{ .service }}
  periodSeconds: {{ .probes.startup.periodSeconds }}
  timeoutSeconds: {{ .probes.startup.timeoutSeconds }}
  failureThreshold: {{ .probes.startup.failureThreshold }}
readinessProbe:
  grpc:
    port: {{ $port }}
    service: {{ .service }}
  periodSeconds: {{ .probes.readiness.periodSeconds }}
  timeoutSeconds: {{ .probes.readiness.timeoutSeconds }}
  failureThreshold: {{ .probes.readiness.failureThreshold }}
  successThreshold: {{ .probes.readiness.successThreshold }}
livenessProbe:
  grpc:
    port: {{ $port }}
    service: ""
  periodSeconds: {{ .probes.liveness.periodSeconds }}
  timeoutSeconds: {{ .probes.liveness.timeoutSeconds }}
  failureThreshold: {{ .probes.liveness.failureThreshold }}
{{- end }}

{{/* Container ports of a server. */}}
{{- define "neuron-serve.containerPorts" -}}
- name: grpc
  containerPort: {{ .Values.server.grpcPort }}
  protocol: TCP
- name: metrics
  containerPort: {{ .Values.server.metricsPort }}
  protocol: TCP
{{- if .Values.tls.enabled }}
- name: health
  containerPort: {{ .Values.tls.healthPort }}
  protocol: TCP
{{- end }}
{{- end }}

{{/* Environment of all containers: the ConfigMap, secrets, TLS file names (servers only), extra env.
Call with (dict "ctx" $ "tls" true|false). */}}
{{- define "neuron-serve.env" -}}
{{- $v := .ctx.Values -}}
envFrom:
  - configMapRef:
      name: {{ include "neuron-serve.configMapName" .ctx }}
env:
  - name: POD_NAME
    valueFrom:
      fieldRef:
        fieldPath: metadata.name
  - name: POD_NAMESPACE
    valueFrom:
      fieldRef:
        fieldPath: metadata.namespace
{{- with $v.secrets.hfToken.existingSecret }}
  - name: HF_TOKEN
    valueFrom:
      secretKeyRef:
        name: {{ . }}
        key: {{ $v.secrets.hfToken.key }}
{{- end }}
{{- if and .tls $v.tls.enabled }}
  - name: NEURON_SERVE_TLS_CERT
    value: /etc/neuron-serve/tls/tls.crt
  - name: NEURON_SERVE_TLS_KEY
    value: /etc/neuron-serve/tls/tls.key
  {{- if $v.tls.clientAuth }}
  - name: NEURON_SERVE_TLS_CLIENT_CA
    value: /etc/neuron-serve/tls/ca.crt
  {{- end }}
  - name: NEURON_SERVE_HEALTH_PORT
    value: {{ $v.tls.healthPort | quote }}
{{- end }}
{{- with $v.server.extraEnv }}
{{ toYaml . | indent 2 }}
{{- end }}
{{- end }}

{{/*
Writable mounts (the root filesystem is read-only): /tmp, the cache dir, the store volume, TLS.
Call with (dict "ctx" $ "tls" true|false).
*/}}
{{- define "neuron-serve.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: /var/cache/neuron-serve
{{- if include "neuron-serve.storeIsFile" .ctx }}
- name: store
  mountPath: {{ include "neuron-serve.storeMountPath" .ctx }}
{{- end }}
{{- if and .tls .ctx.Values.tls.enabled }}
- name: tls
  mountPath: /etc/neuron-serve/tls
  readOnly: true
{{- end }}
{{- end }}

{{/* The volumes behind neuron-serve.volumeMounts. Call with (dict "ctx" $ "tls" bool "values" <component values>). */}}
{{- define "neuron-serve.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .values.tmp.sizeLimit }}
- name: cache
  emptyDir:
    sizeLimit: {{ .values.cache.sizeLimit }}
{{- if include "neuron-serve.storeIsFile" .ctx }}
- name: store
  {{- if .ctx.Values.store.volume.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .ctx.Values.store.volume.existingClaim }}
  {{- else }}
  emptyDir:
    sizeLimit: {{ .ctx.Values.store.volume.sizeLimit }}
  {{- end }}
{{- end }}
{{- if and .tls .ctx.Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ required "tls.secretName is required when tls.enabled is true" .ctx.Values.tls.secretName }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{/* preStop sleep hook (lets endpoint removal propagate before SIGTERM). Call with the component's values. */}}
{{- define "neuron-serve.lifecycle" -}}
{{- if gt (int .preStopSleepSeconds) 0 -}}
lifecycle:
  preStop:
    exec:
      command: ["sleep", "{{ .preStopSleepSeconds }}"]
{{- end }}
{{- end }}

{{/* Pod annotations for Prometheus scraping. */}}
{{- define "neuron-serve.metricsAnnotations" -}}
{{- if .Values.metrics.podAnnotations -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.server.metricsPort | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}

{{/* Egress rules when egress is restricted: DNS, the allowed TCP ports, extra rules. */}}
{{- define "neuron-serve.egressRules" -}}
{{- $np := .Values.networkPolicy -}}
- to:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: kube-system
      podSelector:
        matchLabels:
          k8s-app: kube-dns
  ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
{{- if $np.egress.ports }}
- ports:
    {{- range $np.egress.ports }}
    - port: {{ . | int }}
      protocol: TCP
    {{- end }}
{{- end }}
{{- with $np.egress.extraRules }}
{{ toYaml . }}
{{- end }}
{{- end }}
