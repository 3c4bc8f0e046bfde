{{/* Names and labels shared by every template. */}}

{{- define "twinvol.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "twinvol.labels" -}}
app.kubernetes.io/name: twinvol
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "operator") */}}
{{- define "twinvol.selector" -}}
app.kubernetes.io/name: twinvol
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "twinvol.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "twinvol.secretName" -}}
{{- default (printf "%s-replication" (include "twinvol.fullname" .)) .Values.replicationSecret.existingSecret -}}
{{- end -}}

{{- define "twinvol.sa" -}}
{{- printf "%s-%s" (include "twinvol.fullname" .ctx) .component -}}
{{- end -}}

{{/* The CSI socket of the node plugin, at the same path on host and in the container. */}}
{{- define "twinvol.nodeSocketDir" -}}
{{- printf "%s/plugins/csi.twinvol.io" (trimSuffix "/" .Values.kubeletDir) -}}
{{- end -}}

{{/* Checks of the values, failing the render with a message. */}}
{{- define "twinvol.validate" -}}
{{- $names := dict -}}
{{- range .Values.sites -}}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" (toString .name)) -}}
{{- fail (printf "sites: %q is not a DNS label (lower-case letters, digits, '-')" (toString .name)) -}}
{{- end -}}
{{- if hasKey $names .name -}}
{{- fail (printf "sites: %q is named twice" .name) -}}
{{- end -}}
{{- $_ := set $names .name true -}}
{{- if not .nodeSelector -}}
{{- fail (printf "sites: %q needs a nodeSelector (an empty one would select every node)" .name) -}}
{{- end -}}
{{- if not (hasPrefix "/" (toString .pool)) -}}
{{- fail (printf "sites: %q needs pool, an absolute path (a directory or /dev/...)" .name) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.sites (ne (len .Values.sites) 2) -}}
{{- fail (printf "sites: mirrored volumes span exactly two Sites; %d given" (len .Values.sites)) -}}
{{- end -}}
{{- if not (has .Values.storageClass.failback (list "Automatic" "Manual")) -}}
{{- fail "storageClass.failback must be Automatic or Manual" -}}
{{- end -}}
{{- if not (has .Values.storageClass.fsType (list "ext4" "xfs")) -}}
{{- fail "storageClass.fsType must be ext4 or xfs" -}}
{{- end -}}
{{- if not (hasPrefix "/" .Values.kubeletDir) -}}
{{- fail "kubeletDir must be an absolute path" -}}
{{- end -}}
{{- if and (contains "$(NODE_NAME)" .Values.kubeletDir) (not (regexMatch "^/.+/\\$\\(NODE_NAME\\)(/|$)" .Values.kubeletDir)) -}}
{{- fail "kubeletDir: $(NODE_NAME) must be a whole path component below the root, as in /nodes/$(NODE_NAME)/kubelet" -}}
{{- end -}}
{{- end -}}
