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
  {{- if .Values.rbac.watchSecrets }}
  verbs: [get, list, watch]
  {{- else }}
  verbs: [get]
  {{- end }}
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

{{/* The operator's --egress-deny rules: egress.deniedCIDRs, and loopback when asked. */}}
{{- define "backflow.egressDeny" -}}
{{- $rules := .Values.egress.deniedCIDRs }}
{{- if .Values.egress.denyLoopback }}{{ $rules = append $rules "loopback" }}{{ end }}
{{- join "," $rules }}
{{- end }}

{{/*
Egress rules of the operator and run pods: DNS, the API server, and anywhere outside
egress.deniedCIDRs (one ipBlock per address family, each denied range in its `except`).
*/}}
{{- define "backflow.egressRules" -}}
{{- $v4 := list }}
{{- $v6 := list }}
{{- range .Values.egress.deniedCIDRs }}
{{- if contains ":" . }}{{ $v6 = append $v6 . }}{{ else }}{{ $v4 = append $v4 . }}{{ end }}
{{- end }}
# DNS, wherever the cluster's resolver listens (NodeLocal DNSCache answers on 169.254.20.10).
- ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
{{- with .Values.networkPolicy.apiServer }}
# The Kubernetes API server.
- to:
    {{- toYaml . | nindent 4 }}
  ports:
    {{- range $.Values.networkPolicy.apiServerPorts }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
{{- end }}
# Warehouses and destinations: anywhere but the denied ranges.
- to:
    - ipBlock:
        cidr: 0.0.0.0/0
        {{- with $v4 }}
        except:
          {{- toYaml . | nindent 10 }}
        {{- end }}
    - ipBlock:
        cidr: ::/0
        {{- with $v6 }}
        except:
          {{- toYaml . | nindent 10 }}
        {{- end }}
{{- with .Values.networkPolicy.extraEgress }}
{{ toYaml . }}
{{- end }}
{{- end }}
