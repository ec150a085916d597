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
{{- /* Pinned to ${NODE}: the coordinator checks this and the rest of protocol/src/pod_policy.rs
       per run; refusing the common mistake here saves an install that could never run. */ -}}
{{- $byName := eq (toString (dig "spec" "nodeName" "" $parsed)) "node" -}}
{{- $bySelector := eq (toString (dig "spec" "nodeSelector" "kubernetes.io/hostname" "" $parsed)) "node" -}}
{{- $byAffinity := not (empty (dig "spec" "affinity" "nodeAffinity" "requiredDuringSchedulingIgnoredDuringExecution" "" $parsed)) -}}
{{- if not (or $byName $bySelector $byAffinity) -}}
{{- fail "defaults.verificationPod must run on the node it verifies: set spec.nodeSelector kubernetes.io/hostname: ${NODE} (or spec.nodeName: ${NODE})" -}}
{{- end -}}
{{- $pod -}}
{{- end }}

{{/*
Admission policies (ValidatingAdmissionPolicy v1, Kubernetes >= 1.30): rendered where the API
exists and `agent.restrictToOwnNode` is on.
*/}}
{{- define "klm.admissionPolicies" -}}
{{- if and .Values.agent.restrictToOwnNode (.Capabilities.APIVersions.Has "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy") }}true{{ end }}
{{- end }}

{{/* The user a pod of the agent ServiceAccount authenticates as. */}}
{{- define "klm.agentUser" -}}
{{- printf "system:serviceaccount:%s:%s" .Release.Namespace (include "klm.agentName" .) }}
{{- end }}

{{/*
The node a request by the agent comes from: the API server writes it into every token bound to
a pod (user extra `authentication.kubernetes.io/node-name`, Kubernetes >= 1.30). Empty for a
token without it (bound to no pod, or to an unscheduled one), which every policy refuses.
*/}}
{{- define "klm.agentNodeVariable" -}}
- name: nodeName
  expression: >-
    has(request.userInfo.extra) && 'authentication.kubernetes.io/node-name' in request.userInfo.extra
    && size(request.userInfo.extra['authentication.kubernetes.io/node-name']) == 1
    ? request.userInfo.extra['authentication.kubernetes.io/node-name'][0] : ''
{{- end }}

{{- define "klm.agentNodeClaimValidation" -}}
- expression: variables.nodeName != ''
  message: >-
    the kata-lifecycle-manager agent's token carries no node (user extra
    authentication.kubernetes.io/node-name): only the token bound to an agent pod on a node
    may act, and only on that node
  reason: Forbidden
{{- end }}

{{/*
CEL: the pod spec `.` (an expression such as `object.spec`) can only run on variables.nodeName:
`nodeName` names it, or (unscheduled) a `kubernetes.io/hostname` nodeSelector or a required
node affinity every term of which pins it (DaemonSet pods use matchFields metadata.name).
Mirrors protocol/src/pod_policy.rs.
*/}}
{{- define "klm.celPinnedToNode" -}}
({{ . }}.?nodeName.orValue('') != ''
  ? {{ . }}.nodeName == variables.nodeName
  : ({{ . }}.?nodeSelector[?'kubernetes.io/hostname'].orValue('') == variables.nodeName
     || (size({{ . }}.?affinity.?nodeAffinity.?requiredDuringSchedulingIgnoredDuringExecution.?nodeSelectorTerms.orValue([])) > 0
         && {{ . }}.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms.all(t,
              t.?matchExpressions.orValue([]).exists(r, r.key == 'kubernetes.io/hostname' && r.operator == 'In' && r.?values.orValue([]) == [variables.nodeName])
              || t.?matchFields.orValue([]).exists(r, r.key == 'metadata.name' && r.operator == 'In' && r.?values.orValue([]) == [variables.nodeName])))))
{{- end }}

{{/*
In-cluster API server address (`apiServer.host`/`port`) for clusters whose `kubernetes` Service
is unreachable (no kube-proxy). Both binaries build their client from KUBERNETES_SERVICE_HOST/PORT
and the mounted token; a container's own env wins over the values the kubelet injects.
*/}}
{{- define "klm.apiServerEnv" -}}
{{- with .Values.apiServer.host -}}
- name: KUBERNETES_SERVICE_HOST
  value: {{ . | quote }}
- name: KUBERNETES_SERVICE_PORT
  value: {{ $.Values.apiServer.port | toString | quote }}
{{- end }}
{{- end }}
