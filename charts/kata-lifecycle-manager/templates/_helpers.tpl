{{/*
Names
*/}}
{{- define "klm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name; also the name of the trigger ConfigMap users annotate, so the
default release name `kata-lifecycle-manager` yields exactly `kata-lifecycle-manager`.
Kept to 52 characters so every derived name ("-verification-pod", "-coordinator") fits 63.
*/}}
{{- define "klm.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "klm.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "klm.triggerConfigMap" -}}{{ include "klm.fullname" . }}{{- end }}
{{- define "klm.verificationConfigMap" -}}{{ include "klm.fullname" . }}-verification-pod{{- end }}
{{- define "klm.upgradeLease" -}}{{ include "klm.fullname" . }}-upgrade{{- end }}
{{- define "klm.leaderLease" -}}{{ include "klm.fullname" . }}-coordinator{{- end }}
{{- define "klm.agentName" -}}{{ include "klm.fullname" . }}-agent{{- end }}
{{- define "klm.coordinatorName" -}}{{ include "klm.fullname" . }}-coordinator{{- end }}

{{/*
Labels. Call with (dict "root" $ "component" "agent"); component may be empty.
*/}}
{{- define "klm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "klm.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end }}

{{- define "klm.labels" -}}
helm.sh/chart: {{ include "klm.chart" .root }}
{{ include "klm.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: kata-lifecycle-manager
{{- end }}

{{/*
Images: the tag defaults to the chart's appVersion.
*/}}
{{- define "klm.image" -}}
{{- printf "%s:%s" .repository (toString (.tag | default .appVersion)) }}
{{- end }}

{{/*
Namespaces the RBAC reaches into. uniq: the kata-deploy and verification namespaces may be the
same, and may equal the release namespace; each list yields one Role per namespace.
*/}}
{{- define "klm.kataDeployNamespaces" -}}
{{- prepend .Values.rbac.extraKataDeployNamespaces .Values.defaults.helmNamespace | uniq | toJson }}
{{- end }}
{{- define "klm.verificationNamespaces" -}}
{{- prepend .Values.rbac.extraVerificationNamespaces .Values.defaults.verificationNamespace | uniq | toJson }}
{{- end }}

{{/*
The verification pod is required: without it every run would fail at its first node.
Checked early (at install) with the same placeholders substituted the agents substitute, so a
file that is not a Pod with restartPolicy Never is refused here instead of at the first run.
*/}}
{{- define "klm.verificationPod" -}}
{{- $pod := .Values.defaults.verificationPod | default "" | trim -}}
{{- if not $pod -}}
{{- fail "\n\ndefaults.verificationPod is required: the pod that proves a node works after its upgrade.\nPass it with:\n\n  --set-file defaults.verificationPod=./my-verification-pod.yaml\n\n(see the chart README for an example pod using ${NODE} and ${TEST_POD})" -}}
{{- end -}}
{{- $parsed := $pod | replace "${NODE}" "node" | replace "${TEST_POD}" "test-pod" | fromYaml -}}
{{- if hasKey $parsed "Error" -}}
{{- fail (printf "defaults.verificationPod is not valid YAML: %s" $parsed.Error) -}}
{{- end -}}
{{- if ne (toString $parsed.kind) "Pod" -}}
{{- fail (printf "defaults.verificationPod must be a Pod manifest (kind: Pod), got kind %q" (toString $parsed.kind)) -}}
{{- end -}}
{{- if ne (toString (dig "spec" "restartPolicy" "" $parsed)) "Never" -}}
{{- fail "defaults.verificationPod must set spec.restartPolicy: Never (its exit code is the verdict)" -}}
{{- end -}}
{{- $pod -}}
{{- end }}
