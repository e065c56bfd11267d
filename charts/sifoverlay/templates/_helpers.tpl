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
