{{- define "inhouse.fullname" -}}
{{ .Release.Name }}-inhouse
{{- end }}

{{- define "inhouse.labels" -}}
app.kubernetes.io/name: inhouse
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "inhouse.selectorLabels" -}}
app.kubernetes.io/name: inhouse
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "inhouse.scheme" -}}
{{- if .Values.tls.enabled }}HTTPS{{ else }}HTTP{{ end }}
{{- end }}
