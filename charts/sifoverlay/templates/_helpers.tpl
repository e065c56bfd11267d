{{/* Names and labels shared by every template. */}}
{{- define "sifoverlay.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "sifoverlay.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "sifoverlay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sifoverlay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "sifoverlay.labels" -}}
{{ include "sifoverlay.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "sifoverlay.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "sifoverlay.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* SIFOVERLAY_VOLUME_ROOTS: "hostPath:/dir=/volumes/NAME,pvc:NS/CLAIM=/volumes/NAME" */}}
{{- define "sifoverlay.volumeRoots" -}}
{{- $roots := list -}}
{{- range .Values.operator.imageVolumes -}}
{{- if .hostPath -}}
{{- $roots = append $roots (printf "hostPath:%s=/volumes/%s" .hostPath .name) -}}
{{- else -}}
{{- $roots = append $roots (printf "pvc:%s/%s=/volumes/%s" $.Release.Namespace .persistentVolumeClaim.claimName .name) -}}
{{- end -}}
{{- end -}}
{{- join "," $roots -}}
{{- end -}}

{{/* The operator's pinned image: repository@digest, else repository:tag. */}}
{{- define "sifoverlay.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{/* Cluster mode (no watchNamespaces) or namespaced mode. */}}
{{- define "sifoverlay.clusterMode" -}}
{{- if not .Values.watchNamespaces -}}true{{- end -}}
{{- end -}}

{{/* CEL list literal of [namespace-or-*, value] pairs of the image volume rules of one kind. */}}
{{- define "sifoverlay.celPairs" -}}
{{- $kind := .kind -}}
{{- $pairs := list -}}
{{- range .rules -}}
{{- $value := get . $kind -}}
{{- if $value -}}
{{- $value = trimSuffix "/" (toString $value) -}}
{{- if .namespaces -}}
{{- range .namespaces -}}
{{- $pairs = append $pairs (printf "[%s, %s]" (toJson .) (toJson $value)) -}}
{{- end -}}
{{- else -}}
{{- $pairs = append $pairs (printf "[\"*\", %s]" (toJson $value)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
[{{ join ", " $pairs }}]
{{- end -}}
