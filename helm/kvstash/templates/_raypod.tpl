{{/* The pod spec of a Ray head or worker: dict ctx name resources gpus nodeSelector tolerations ports
     serviceAccountToken (the head's autoscaler sidecar talks to the Kubernetes API). */}}
{{- define "kvstash.rayPodSpec" -}}
{{- $ := .ctx -}}
{{- $resources := deepCopy .resources }}
{{- if gt (int .gpus) 0 }}
{{- $_ := set $resources "limits" (merge (dict "nvidia.com/gpu" (int .gpus)) ($resources.limits | default dict)) }}
{{- end -}}
automountServiceAccountToken: {{ .serviceAccountToken | default false }}
{{- with $.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  runAsNonRoot: true
  runAsUser: 1000
  runAsGroup: 100
  fsGroup: 100
containers:
  - name: {{ .name }}
    image: {{ include "kvstash.rayImage" $ | quote }}
    imagePullPolicy: {{ $.Values.ray.image.pullPolicy }}
    {{- with .ports }}
    ports:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    resources:
      {{- toYaml $resources | nindent 6 }}
    securityContext:
      allowPrivilegeEscalation: false
    volumeMounts:
      - name: dshm
        mountPath: /dev/shm
      {{- if $.Values.config.tiers.journal }}
      - name: journal
        mountPath: {{ $.Values.config.tiers.journal_dir }}
      {{- end }}
volumes:
  - name: dshm
    emptyDir:
      medium: Memory
      sizeLimit: {{ $.Values.ray.shmSize }}
  {{- if $.Values.config.tiers.journal }}
  - name: journal
    {{- if $.Values.ray.journalClaim }}
    persistentVolumeClaim:
      claimName: {{ $.Values.ray.journalClaim }}
    {{- else }}
    emptyDir: {}
    {{- end }}
  {{- end }}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
