{{/*
Chart name, truncated to the 63 characters a label value allows.
*/}}
{{- define "overlay-csi.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Fully qualified name: the release name, prefixed to the chart name unless it
already contains it.
*/}}
{{- define "overlay-csi.fullname" -}}
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

{{- define "overlay-csi.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Selector labels. Call with (dict "root" $ "component" "node").
*/}}
{{- define "overlay-csi.selectorLabels" -}}
app.kubernetes.io/name: {{ include "overlay-csi.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/*
Common labels. Call with (dict "root" $ "component" "node").
*/}}
{{- define "overlay-csi.labels" -}}
{{ include "overlay-csi.selectorLabels" . }}
helm.sh/chart: {{ include "overlay-csi.chart" .root }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: overlay-csi
{{- with .root.Values.customLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
Image reference of the driver.
*/}}
{{- define "overlay-csi.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion (toString .Values.image.tag)) -}}
{{- end -}}

{{/*
Image reference of a sidecar: (include "overlay-csi.sidecarImage" .Values.sidecars.provisioner.image)
*/}}
{{- define "overlay-csi.sidecarImage" -}}
{{- printf "%s:%s" .repository (toString .tag) -}}
{{- end -}}

{{/*
Kubelet paths. Everything the kubelet sees is derived from kubeletDir.
*/}}
{{- define "overlay-csi.kubeletDir" -}}
{{- .Values.kubeletDir | trimSuffix "/" -}}
{{- end -}}

{{- define "overlay-csi.socketDir" -}}
{{- printf "%s/plugins/%s" (include "overlay-csi.kubeletDir" .) .Values.driverName -}}
{{- end -}}

{{- define "overlay-csi.registrationDir" -}}
{{- printf "%s/plugins_registry" (include "overlay-csi.kubeletDir" .) -}}
{{- end -}}

{{/*
The driver socket as seen inside every container of a pod (socket-dir is
mounted at /csi in each of them).
*/}}
{{- define "overlay-csi.csiAddress" -}}
/csi/csi.sock
{{- end -}}

{{- define "overlay-csi.nodeServiceAccountName" -}}
{{- if .Values.node.serviceAccount.create -}}
{{- default (printf "%s-node" (include "overlay-csi.fullname" .)) .Values.node.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.node.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "overlay-csi.controllerServiceAccountName" -}}
{{- if .Values.controller.serviceAccount.create -}}
{{- default (printf "%s-controller" (include "overlay-csi.fullname" .)) .Values.controller.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.controller.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
Downward-API environment shared by the driver and the sidecars.
*/}}
{{- define "overlay-csi.nodeNameEnv" -}}
- name: NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
{{- end -}}

{{- define "overlay-csi.podEnv" -}}
- name: NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- end -}}

{{/*
Security context of the unprivileged sidecars.
*/}}
{{- define "overlay-csi.sidecarSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
{{- end -}}

{{/*
The registry snapshotter's name: its csi-snapshotter's NODE_NAME and the
managed-by label value of the contents it checks (a label value: 63 characters).
*/}}
{{- define "overlay-csi.registrySnapshotterName" -}}
{{- printf "%s-registry" (include "overlay-csi.fullname" . | trunc 54 | trimSuffix "-") -}}
{{- end }}

{{/*
The address the node plugin serves metrics on (metrics.bindAddress): the pod's
own IP from the downward API, localhost, or an address given as is.
*/}}
{{- define "overlay-csi.metricsHost" -}}
{{- $a := .Values.metrics.bindAddress | toString -}}
{{- if eq $a "podIP" -}}$(POD_IP)
{{- else if eq $a "localhost" -}}127.0.0.1
{{- else -}}{{ $a }}
{{- end -}}
{{- end -}}
