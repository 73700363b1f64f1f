{{/* The chart's name, trimmed for DNS. */}}
{{- define "webhook-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: the release name, with the chart name unless it already holds it. */}}
{{- define "webhook-operator.fullname" -}}
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

{{- define "webhook-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "webhook-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "webhook-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "webhook-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "webhook-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "webhook-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "webhook-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "webhook-operator.distributed" -}}
{{- if eq .Values.queue.mode "jetstream" }}true{{ end }}
{{- end }}

{{/* The pod template shared by the StatefulSet (embedded) and the Deployment (jetstream). */}}
{{- define "webhook-operator.podTemplate" -}}
{{- $distributed := include "webhook-operator.distributed" . -}}
{{- $op := .Values.operator -}}
metadata:
  labels:
    {{- include "webhook-operator.selectorLabels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "webhook-operator.serviceAccountName" . }}
  automountServiceAccountToken: true
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  containers:
    - name: operator
      image: {{ include "webhook-operator.image" . }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args: [run]
      env:
        - name: WEBHOOK_OPERATOR_INGRESS_ADDR
          value: "0.0.0.0:8080"
        - name: WEBHOOK_OPERATOR_OPS_ADDR
          value: "0.0.0.0:9090"
        - name: WEBHOOK_OPERATOR_DATA_DIR
          value: /var/lib/webhook-operator
        - name: WEBHOOK_OPERATOR_MAX_BODY_BYTES
          value: {{ $op.maxBodyBytes | int | quote }}
        - name: WEBHOOK_OPERATOR_MAX_QUEUED_EVENTS
          value: {{ $op.limits.maxQueuedEvents | int64 | quote }}
        - name: WEBHOOK_OPERATOR_MAX_ENDPOINT_QUEUED_EVENTS
          value: {{ $op.limits.maxEndpointQueuedEvents | int64 | quote }}
        - name: WEBHOOK_OPERATOR_MAX_QUEUED_BYTES
          value: {{ $op.limits.maxQueuedBytes | int64 | quote }}
        - name: WEBHOOK_OPERATOR_MAX_ENDPOINT_QUEUED_BYTES
          value: {{ $op.limits.maxEndpointQueuedBytes | int64 | quote }}
        - name: WEBHOOK_OPERATOR_MIN_FREE_DISK_BYTES
          value: {{ $op.limits.minFreeDiskBytes | int64 | quote }}
        - name: WEBHOOK_OPERATOR_MAX_CONCURRENT_REQUESTS
          value: {{ $op.limits.maxConcurrentRequests | int | quote }}
        - name: WEBHOOK_OPERATOR_MAX_CONNECTIONS
          value: {{ $op.limits.maxConnections | int | quote }}
        - name: WEBHOOK_OPERATOR_HEADER_READ_TIMEOUT
          value: {{ $op.limits.headerReadTimeout | quote }}
        - name: WEBHOOK_OPERATOR_BODY_READ_TIMEOUT
          value: {{ $op.limits.bodyReadTimeout | quote }}
        - name: WEBHOOK_OPERATOR_MAX_DEDUPE_KEYS
          value: {{ $op.limits.maxDedupeKeys | int64 | quote }}
        - name: WEBHOOK_OPERATOR_MAX_CONCURRENT_RECONCILES
          value: {{ $op.maxConcurrentReconciles | int | quote }}
        - name: WEBHOOK_OPERATOR_LOG_JSON
          value: {{ $op.logJSON | quote }}
        - name: WEBHOOK_OPERATOR_ALLOW_LINK_LOCAL
          value: {{ $op.allowLinkLocal | quote }}
        - name: WEBHOOK_OPERATOR_ALLOW_CROSS_NAMESPACE_REFS
          value: {{ $op.allowCrossNamespaceRefs | quote }}
        - name: WEBHOOK_OPERATOR_REQUIRE_SECRET_LABEL
          value: {{ $op.requireSecretLabel | quote }}
        - name: RUST_LOG
          value: {{ $op.logLevel | quote }}
        {{- with $op.tracing.otlpEndpoint }}
        - name: OTEL_EXPORTER_OTLP_ENDPOINT
          value: {{ . | quote }}
        {{- end }}
        {{- with $op.publicBaseURL }}
        - name: WEBHOOK_OPERATOR_PUBLIC_BASE_URL
          value: {{ . | quote }}
        {{- end }}
        {{- with $op.watchNamespace }}
        - name: WEBHOOK_OPERATOR_NAMESPACE
          value: {{ . | quote }}
        {{- end }}
        {{- with $op.providers.sandboxURL }}
        - name: WEBHOOK_OPERATOR_PROVIDER_SANDBOX_URL
          value: {{ . | quote }}
        {{- end }}
        {{- with $op.providers.atlasAPIURL }}
        - name: WEBHOOK_OPERATOR_ATLAS_API_URL
          value: {{ . | quote }}
        {{- end }}
        {{- with $op.providers.atlasListPath }}
        - name: WEBHOOK_OPERATOR_ATLAS_LIST_PATH
          value: {{ . | quote }}
        {{- end }}
        {{- with $op.providers.atomicAPIURL }}
        - name: WEBHOOK_OPERATOR_ATOMIC_API_URL
          value: {{ . | quote }}
        {{- end }}
        {{- with $op.providers.atomicTokenURL }}
        - name: WEBHOOK_OPERATOR_ATOMIC_TOKEN_URL
          value: {{ . | quote }}
        {{- end }}
        {{- with $op.providers.smallestAPIURL }}
        - name: WEBHOOK_OPERATOR_SMALLEST_API_URL
          value: {{ . | quote }}
        {{- end }}
        - name: POD_NAME
          valueFrom:
            fieldRef: {fieldPath: metadata.name}
        - name: POD_NAMESPACE
          valueFrom:
            fieldRef: {fieldPath: metadata.namespace}
        {{- if $distributed }}
        {{- $js := .Values.queue.jetstream }}
        - name: WEBHOOK_OPERATOR_QUEUE
          value: jetstream
        - name: WEBHOOK_OPERATOR_NATS_URL
          value: {{ required "queue.jetstream.natsURL is required when queue.mode is jetstream" $js.natsURL | quote }}
        - name: WEBHOOK_OPERATOR_NATS_REPLICAS
          value: {{ $js.streamReplicas | int | quote }}
        - name: WEBHOOK_OPERATOR_NATS_STORAGE
          value: {{ $js.streamStorage | quote }}
        - name: WEBHOOK_OPERATOR_NATS_MAX_BYTES
          value: {{ $js.maxBytes | int64 | quote }}
        - name: WEBHOOK_OPERATOR_NATS_DEAD_LETTER_MAX_AGE
          value: {{ $js.deadLetterMaxAge | quote }}
        {{- with $js.credentials.secretName }}
        {{- if eq $js.credentials.type "creds" }}
        - name: WEBHOOK_OPERATOR_NATS_CREDENTIALS_FILE
        {{- else if eq $js.credentials.type "token" }}
        - name: WEBHOOK_OPERATOR_NATS_TOKEN_FILE
        {{- else }}
        - name: WEBHOOK_OPERATOR_NATS_USER
          value: {{ required "queue.jetstream.credentials.user is required with type password" $js.credentials.user | quote }}
        - name: WEBHOOK_OPERATOR_NATS_PASSWORD_FILE
        {{- end }}
          value: /etc/webhook-operator/nats/{{ $js.credentials.key }}
        {{- end }}
        - name: WEBHOOK_OPERATOR_LEADER_ELECTION
          value: "true"
        - name: WEBHOOK_OPERATOR_LEADER_ELECTION_NAMESPACE
          value: {{ .Release.Namespace | quote }}
        - name: WEBHOOK_OPERATOR_LEASE_NAME
          value: {{ $js.leaseName | quote }}
        {{- end }}
        {{- with $op.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        - name: ingress
          containerPort: 8080
          protocol: TCP
        - name: ops
          containerPort: 9090
          protocol: TCP
      livenessProbe:
        httpGet: {path: /healthz, port: ops}
        periodSeconds: 10
        failureThreshold: 3
      # Probed every second, so a restarted pod is back behind the Service within a second
      # of being ready (with one embedded replica the ingress refuses connections until
      # then); still out of the Service after 10 s of failures, and 60 s to start.
      readinessProbe:
        httpGet: {path: /readyz, port: ops}
        periodSeconds: 1
        failureThreshold: 10
      startupProbe:
        httpGet: {path: /healthz, port: ops}
        periodSeconds: 1
        failureThreshold: 60
      {{- if $distributed }}
      # A replica going away keeps serving for 5 s before SIGTERM, until the Service has
      # dropped it (kube-proxy applies that a moment later): a rolling upgrade of several
      # replicas then refuses no connection.
      lifecycle:
        preStop:
          sleep: {seconds: 5}
      {{- end }}
      resources:
        {{- toYaml .Values.resources | nindent 8 }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: data
          mountPath: /var/lib/webhook-operator
        - name: tmp
          mountPath: /tmp
        {{- if and $distributed .Values.queue.jetstream.credentials.secretName }}
        - name: nats-credentials
          mountPath: /etc/webhook-operator/nats
          readOnly: true
        {{- end }}
  volumes:
    - name: tmp
      emptyDir: {sizeLimit: 64Mi}
    {{- if $distributed }}
    {{- /* The queue lives in JetStream; the data dir only holds scratch state. */}}
    - name: data
      emptyDir: {sizeLimit: 256Mi}
    {{- with .Values.queue.jetstream.credentials.secretName }}
    - name: nats-credentials
      secret:
        secretName: {{ . }}
        defaultMode: 0400
    {{- end }}
    {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
