{{/*
Names and labels, the deployment name, pdserve's ports (from its own config keys), and the Ray auth
environment that every container of the cluster shares.
*/}}

{{- define "pdserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The RayCluster's name; KubeRay derives pod and head Service names from it, so it stays short. */}}
{{- define "pdserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains (include "pdserve.name" .) .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "pdserve.name" .) | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pdserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "pdserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* KubeRay labels every pod of the cluster with these; the head pod also has ray.io/node-type: head. */}}
{{- define "pdserve.clusterSelector" -}}
ray.io/cluster: {{ include "pdserve.fullname" . }}
{{- end -}}

{{- define "pdserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* The pdserve deployment name: pdserve.name, else the release name. */}}
{{- define "pdserve.deploymentName" -}}
{{- $name := .Values.pdserve.name | default .Release.Name -}}
{{- if not (regexMatch "^[A-Za-z0-9][A-Za-z0-9_.-]*$" $name) -}}
{{- fail (printf "pdserve.name %q: must match ^[A-Za-z0-9][A-Za-z0-9_.-]*$" $name) -}}
{{- end -}}
{{- $name -}}
{{- end -}}

{{- define "pdserve.rayAuthSecret" -}}
{{- .Values.rayAuth.existingSecret | default (printf "%s-ray-auth" (include "pdserve.fullname" .)) -}}
{{- end -}}

{{/* Ray token auth for a container: every Ray process and client of the cluster shares one token. */}}
{{- define "pdserve.rayAuthEnv" -}}
- name: RAY_AUTH_MODE
  value: {{ .Values.rayAuth.mode | quote }}
{{- if eq .Values.rayAuth.mode "token" }}
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "pdserve.rayAuthSecret" . }}
      key: auth_token
{{- end }}
{{- end -}}

{{/* Ports pdserve listens on, from its own config keys (frontend i serves on frontend.port + i). */}}
{{- define "pdserve.apiPort" -}}
{{- $fe := .Values.pdserve.frontend | default dict -}}
{{- if hasKey $fe "port" -}}{{- int $fe.port -}}{{- else -}}8000{{- end -}}
{{- end -}}

{{- define "pdserve.frontends" -}}
{{- $fe := .Values.pdserve.frontend | default dict -}}
{{- int ($fe.frontends | default 1) -}}
{{- end -}}

{{- define "pdserve.controllerPort" -}}
{{- $c := .Values.pdserve.controller | default dict -}}
{{- if not (hasKey $c "metrics_port") -}}9400
{{- else if eq (int $c.metrics_port) 0 -}}
{{- fail "pdserve.controller.metrics_port 0 (any free port) cannot be reached through a Service; give a port" -}}
{{- else -}}{{- int $c.metrics_port -}}{{- end -}}
{{- end -}}

{{- define "pdserve.autoscaling" -}}
{{- if (.Values.pdserve.autoscaling | default dict).enabled -}}true{{- end -}}
{{- end -}}

{{/* A `ray start --resources` value as KubeRay passes it through a shell: a quoted JSON object. */}}
{{- define "pdserve.rayResources" -}}
{{- printf "\"%s\"" (toJson . | replace "\"" "\\\"") -}}
{{- end -}}

{{/* The name of frontend i's port: api, api-1, api-2, ... */}}
{{- define "pdserve.apiPortName" -}}
{{- if . -}}api-{{ . }}{{- else -}}api{{- end -}}
{{- end -}}
