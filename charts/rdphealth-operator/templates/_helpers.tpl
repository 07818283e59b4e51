{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "rdphealth.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name of the release's resources. */}}
{{- define "rdphealth.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels on every resource. */}}
{{- define "rdphealth.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "rdphealth.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: rdphealth-operator
{{- end -}}

{{/* Labels that select the operator's pods. */}}
{{- define "rdphealth.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rdphealth.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The ServiceAccount the operator runs as. */}}
{{- define "rdphealth.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "rdphealth.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Lease the replicas elect a leader through. */}}
{{- define "rdphealth.leaseName" -}}
{{- default (include "rdphealth.fullname" .) .Values.leaderElection.leaseName -}}
{{- end -}}

{{/* The image reference: a digest pins it, otherwise the tag (default: appVersion). */}}
{{- define "rdphealth.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
Settings that cannot work together fail the install instead of producing a Deployment that
misbehaves at run time.
*/}}
{{- define "rdphealth.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.leaderElection.enabled) -}}
{{- fail "replicaCount > 1 needs leaderElection.enabled=true: without a Lease every replica would remediate the same VMs" -}}
{{- end -}}
{{- if and .Values.leaderElection.shards (not .Values.leaderElection.enabled) -}}
{{- fail "leaderElection.shards needs leaderElection.enabled=true: shards are held through Leases" -}}
{{- end -}}
{{- if and .Values.azure.workloadIdentity.enabled .Values.azure.clientSecret.existingSecret -}}
{{- fail "choose one Azure credential: azure.workloadIdentity.enabled or azure.clientSecret.existingSecret" -}}
{{- end -}}
{{- if and .Values.azure.clientSecret.existingSecret (not (and .Values.azure.clientSecret.clientId .Values.azure.clientSecret.tenantId)) -}}
{{- fail "azure.clientSecret.existingSecret needs azure.clientSecret.clientId and azure.clientSecret.tenantId" -}}
{{- end -}}
{{- end -}}
