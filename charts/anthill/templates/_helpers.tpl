{{/* The release's full name, at most 40 characters (pod and claim names grow from it). */}}
{{- define "anthill.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "anthill.operatorName" -}}
{{- printf "%s-operator" (include "anthill.fullname" .) -}}
{{- end -}}

{{- define "anthill.clusterName" -}}
{{- default (include "anthill.fullname" .) .Values.cluster.name -}}
{{- end -}}

{{- define "anthill.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (include "anthill.operatorName" .) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- required "operator.serviceAccount.name must name an existing ServiceAccount when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Cluster-wide objects are named after the namespace too: two releases of one name in two
namespaces must not share them. */}}
{{- define "anthill.clusterRoleName" -}}
{{- printf "%s-%s" .Release.Namespace (include "anthill.operatorName" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The labels every object of the release carries (app.kubernetes.io/*). */}}
{{- define "anthill.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{ include "anthill.releaseLabels" . }}
{{- end -}}

{{/* Those of the labels that do not name the application and its instance. */}}
{{- define "anthill.releaseLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: anthill
{{- end -}}

{{/* The operator pod's selector. Its name is not the nodes' (`anthill`): a cluster named after
the release selects its node pods by name and instance, and must not count the operator's. */}}
{{- define "anthill.operatorSelector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}
