{{/* Full name of the release's objects. */}}
{{- define "licensor.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "licensor.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The platform API's pods: a name of their own, so the operator's
selectors never match them. */}}
{{- define "licensor.platformSelectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}-platform
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "licensor.labels" -}}
{{ include "licensor.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "licensor.serviceAccountName" -}}
{{- default (include "licensor.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{/* The Secret holding the webhook's serving certificate. */}}
{{- define "licensor.webhookSecretName" -}}
{{- if eq .Values.webhook.certificate.source "secret" -}}
{{- .Values.webhook.certificate.secretName -}}
{{- else -}}
{{- printf "%s-webhook-tls" (include "licensor.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* Refuses value combinations the schema cannot express. */}}
{{- define "licensor.validate" -}}
{{- if and (eq .Values.backend.kind "embedded") (gt (int .Values.replicaCount) 1) -}}
{{- fail "replicaCount > 1 needs backend.kind: postgres or remote: the embedded store is one SQLite file on one volume" -}}
{{- end -}}
{{- if eq .Values.backend.kind "remote" -}}
{{- if not .Values.backend.remote.url -}}
{{- fail "backend.kind remote needs backend.remote.url (the license platform API, http:// or https://)" -}}
{{- end -}}
{{- if not .Values.backend.remote.account -}}
{{- fail "backend.kind remote needs backend.remote.account" -}}
{{- end -}}
{{- if not .Values.backend.remote.tokenSecret.name -}}
{{- fail "backend.kind remote needs backend.remote.tokenSecret.name: a Secret holding the API token" -}}
{{- end -}}
{{- end -}}
{{- if and .Values.networkPolicy.enabled (empty .Values.networkPolicy.egressCIDRs) -}}
{{- fail "networkPolicy.enabled needs networkPolicy.egressCIDRs: the API server's (and a remote backend's) addresses, or the operator cannot reach them" -}}
{{- end -}}
{{- if and .Values.webhook.enabled (eq .Values.webhook.certificate.source "secret") (not .Values.webhook.certificate.secretName) -}}
{{- fail "webhook.certificate.source secret needs webhook.certificate.secretName: a kubernetes.io/tls Secret (tls.crt, tls.key) for the webhook Service's name" -}}
{{- end -}}
{{- if and (eq .Values.backend.kind "postgres") (not .Values.backend.postgres.urlSecret.name) -}}
{{- fail "backend.kind postgres needs backend.postgres.urlSecret.name: a Secret holding the connection URL (postgres://user:password@host:port/db?sslmode=verify-full&sslrootcert=...)" -}}
{{- end -}}
{{- if and .Values.platform.enabled (eq .Values.backend.kind "embedded") (eq (int .Values.platform.port) (int .Values.metrics.port)) -}}
{{- fail "platform.port and metrics.port must differ: with the embedded store both listen in the operator's pod" -}}
{{- end -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.leaderElection.enabled) -}}
{{- fail "replicaCount > 1 needs leaderElection.enabled: true" -}}
{{- end -}}
{{- end -}}


{{/* The platform API's container (`licensor serve`); the caller adds the
backend's env and volumes. */}}
{{- define "licensor.platformContainer" -}}
- name: platform
  image: "{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}"
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args:
    - serve
    - --listen=0.0.0.0:{{ .Values.platform.port }}
    - --log-format={{ .Values.logFormat }}
    - --rate-limit={{ .Values.platform.rateLimit }}
  ports:
    - name: api
      containerPort: {{ .Values.platform.port }}
      protocol: TCP
  livenessProbe:
    httpGet:
      path: /healthz
      port: api
    periodSeconds: 10
    failureThreshold: 3
  readinessProbe:
    httpGet:
      path: /readyz
      port: api
    periodSeconds: 5
  securityContext:
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    capabilities:
      drop: ["ALL"]
{{- with .Values.platform.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
{{- end }}
{{- end -}}
