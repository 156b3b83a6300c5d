{{/* Chart name, truncated to the 63 characters of a label value. */}}
{{- define "backflow.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: RELEASE-backflow, or RELEASE when it already contains the chart name. */}}
{{- define "backflow.fullname" -}}
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

{{- define "backflow.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every object carries. */}}
{{- define "backflow.labels" -}}
helm.sh/chart: {{ include "backflow.chart" . }}
{{ include "backflow.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: backflow
{{- end }}

{{/* Labels selecting the operator pods. */}}
{{- define "backflow.selectorLabels" -}}
app.kubernetes.io/name: {{ include "backflow.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "backflow.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "backflow.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator image reference: repository@digest, or repository:tag (default appVersion). */}}
{{- define "backflow.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Leader election is on with more than one replica, or when asked for. */}}
{{- define "backflow.leaderElection" -}}
{{- if or .Values.leaderElection.enabled (gt (int .Values.replicaCount) 1) }}true{{ end }}
{{- end }}

{{- define "backflow.leaseName" -}}
{{- default (include "backflow.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}

{{/* The namespaces that get the run pods' ServiceAccount and RoleBinding, as a JSON list. */}}
{{- define "backflow.runNamespaces" -}}
{{- $ns := concat .Values.watchNamespaces .Values.jobRunner.namespaces | uniq }}
{{- if not $ns }}{{ $ns = list .Release.Namespace }}{{ end }}
{{- toJson $ns }}
{{- end }}

{{/*
Rules of the operator (Cluster)Role: what the controller reads and writes in the namespaces it
watches. Leases are in a separate Role of the release namespace.
*/}}
{{- define "backflow.operatorRules" -}}
- apiGroups: [backflow.dev]
  resources: [reversesyncs]
  verbs: [get, list, watch, update, patch]
- apiGroups: [backflow.dev]
  resources: [reversesyncs/status]
  verbs: [get, update, patch]
- apiGroups: [backflow.dev]
  resources: [reversesyncs/finalizers]
  verbs: [update]
- apiGroups: [backflow.dev]
  resources: [destinations]
  verbs: [get, list, watch]
- apiGroups: [backflow.dev]
  resources: [destinations/status]
  verbs: [get, update, patch]
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list, watch, create, update, patch, delete]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, delete]
# Job mode: say on the sync when the run ServiceAccount is missing or the Job cannot
# create its pod (the Job controller's FailedCreate Events).
- apiGroups: [""]
  resources: [serviceaccounts]
  verbs: [get]
- apiGroups: [""]
  resources: [events]
  verbs: [list]
{{- end }}

{{/* Rules of a run pod: one sync, its Destination, their Secrets, the state ConfigMaps. */}}
{{- define "backflow.runRules" -}}
- apiGroups: [backflow.dev]
  resources: [reversesyncs]
  verbs: [get]
- apiGroups: [backflow.dev]
  resources: [reversesyncs/status]
  verbs: [get, update, patch]
- apiGroups: [backflow.dev]
  resources: [destinations]
  verbs: [get]
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list, create, update, patch, delete]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end }}
