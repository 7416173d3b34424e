{{/*
The pdserve config file the chart renders, and the role arithmetic behind its pool sizes.
*/}}

{{- define "pdserve.roles" -}}prefill decode colocated{{- end -}}

{{/* Workers per pod of a role: one per GPU, one on a CPU pod. */}}
{{- define "pdserve.workersPerPod" -}}
{{- max (int .gpus) 1 -}}
{{- end -}}

{{/*
The config file pdserve reads (`pdserve serve --config`): the user's `pdserve:` values with the keys the
chart owns set over them. Pool sizes count workers (one per GPU), and each role's workers need its Ray
resource, which only that role's worker group advertises; frontends and controller need pdserve_head.
*/}}
{{- define "pdserve.config" -}}
{{- $v := .Values -}}
{{- $cfg := deepCopy ($v.pdserve | default dict) -}}
{{- $_ := set $cfg "name" (include "pdserve.deploymentName" .) -}}
{{- $pools := dict "resources" dict -}}
{{- $gpuRoles := list -}}
{{- $cpuRoles := list -}}
{{- $autoscale := eq (toString ($cfg.autoscaling | default dict).enabled) "true" -}}
{{- $maxPods := 0 -}}
{{- range $role := splitList " " (include "pdserve.roles" .) -}}
{{- $r := index $v.roles $role -}}
{{- if $r.enabled -}}
{{- $maxPods = add $maxPods (ternary $r.maxReplicas $r.replicas $autoscale) -}}
{{- if gt (int $r.replicas) (int $r.maxReplicas) -}}
{{- fail (printf "roles.%s: replicas %d is above maxReplicas %d" $role (int $r.replicas) (int $r.maxReplicas)) -}}
{{- end -}}
{{- if lt (int $r.replicas) (int $r.minReplicas) -}}
{{- fail (printf "roles.%s: replicas %d is below minReplicas %d" $role (int $r.replicas) (int $r.minReplicas)) -}}
{{- end -}}
{{- $_ := set $pools $role (mul (int $r.replicas) (include "pdserve.workersPerPod" $r)) -}}
{{- $_ := set $pools.resources $role (dict (printf "pdserve_%s" $role) 1) -}}
{{- if gt (int $r.gpus) 0 -}}{{- $gpuRoles = append $gpuRoles $role -}}{{- else -}}{{- $cpuRoles = append $cpuRoles $role -}}{{- end -}}
{{- else -}}
{{- $_ := set $pools $role 0 -}}
{{- end -}}
{{- end -}}
{{- if and $gpuRoles $cpuRoles -}}
{{- fail (printf "roles: %s have GPUs but %s have none; pdserve runs every engine on one device kind" (join ", " $gpuRoles) (join ", " $cpuRoles)) -}}
{{- end -}}
{{- if eq (add $pools.decode $pools.colocated) 0 -}}
{{- fail "roles: need at least one decode or colocated worker (enable roles.decode or roles.colocated with replicas > 0)" -}}
{{- end -}}
{{- if and $pools.prefill (not $pools.decode) -}}
{{- fail "roles.prefill: prefill workers hand their KV to decode workers; enable roles.decode" -}}
{{- end -}}
{{- $_ := set $cfg "pools" $pools -}}
{{- /* KV moves between pods over the network, where NIXL needs its progress thread (see values.yaml);
"nixl" is pdserve's default transport */ -}}
{{- $kv := $cfg.kv | default dict -}}
{{- if and (gt (int $maxPods) 1) (eq ($kv.transport | default "nixl") "nixl") (not ($kv.nixl | default dict).progress_thread) -}}
{{- fail (printf "pdserve.kv.nixl.progress_thread: false, but the workers can span %d pods: NIXL needs its progress thread to connect across them" (int $maxPods)) -}}
{{- end -}}
{{- $frontend := $cfg.frontend | default dict -}}
{{- $_ := set $frontend "resources" (dict "pdserve_head" 1) -}}
{{- if .Values.apiKeys.existingSecret -}}
{{- $_ := set $frontend "api_keys_file" (printf "%s/api/%s" (include "pdserve.keysDir" .) .Values.apiKeys.key) -}}
{{- end -}}
{{- if .Values.adminKeys.existingSecret -}}
{{- $_ := set $frontend "admin_keys_file" (printf "%s/admin/%s" (include "pdserve.keysDir" .) .Values.adminKeys.key) -}}
{{- end -}}
{{- $_ := set $cfg "frontend" $frontend -}}
{{- $controller := $cfg.controller | default dict -}}
{{- $_ := set $controller "resources" (dict "pdserve_head" 1) -}}
{{- $_ := set $cfg "controller" $controller -}}
{{- $engine := $cfg.engine | default dict -}}
{{- if include "pdserve.modelSource" . -}}
{{- $_ := set $engine "model" (include "pdserve.modelPath" .) -}}
{{- end -}}
{{- if $gpuRoles -}}
{{- $_ := set $engine "device" "cuda" -}}
{{- end -}}
{{- if $engine -}}{{- $_ := set $cfg "engine" $engine -}}{{- end -}}
{{- $auto := $cfg.autoscaling | default dict -}}
{{- if $auto.enabled -}}
{{- if not $auto.prometheus_url -}}
{{- fail "pdserve.autoscaling.enabled needs pdserve.autoscaling.prometheus_url (the in-cluster Prometheus that scrapes this release)" -}}
{{- end -}}
{{- /* pdserve's bounds are the worker groups' bounds, in workers (it keeps at least one decode worker) */ -}}
{{- range $role := list "prefill" "decode" -}}
{{- $r := index $v.roles $role -}}
{{- if $r.enabled -}}
{{- $per := include "pdserve.workersPerPod" $r | int -}}
{{- $least := ternary 1 0 (eq $role "decode") -}}
{{- $_ := set $auto (printf "max_%s" $role) (max $least (mul (int $r.maxReplicas) $per)) -}}
{{- $_ := set $auto (printf "min_%s" $role) (max $least (mul (int $r.minReplicas) $per)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}


{{/*
Key files from Secrets (apiKeys, adminKeys), mounted whole (not by subPath, which the kubelet never updates) in
the ray-head container, where the frontends read them; the config points frontend.*_keys_file there.
*/}}
{{- define "pdserve.keysDir" -}}/etc/pdserve-keys{{- end -}}

{{- define "pdserve.keyMounts" -}}
{{- if .Values.apiKeys.existingSecret }}
- name: api-keys
  mountPath: {{ include "pdserve.keysDir" . }}/api
  readOnly: true
{{- end }}
{{- if .Values.adminKeys.existingSecret }}
- name: admin-keys
  mountPath: {{ include "pdserve.keysDir" . }}/admin
  readOnly: true
{{- end }}
{{- end -}}

{{- define "pdserve.keyVolumes" -}}
{{- if .Values.apiKeys.existingSecret }}
- name: api-keys
  secret:
    secretName: {{ .Values.apiKeys.existingSecret }}
    items:
      - key: {{ .Values.apiKeys.key }}
        path: {{ .Values.apiKeys.key }}
{{- end }}
{{- if .Values.adminKeys.existingSecret }}
- name: admin-keys
  secret:
    secretName: {{ .Values.adminKeys.existingSecret }}
    items:
      - key: {{ .Values.adminKeys.key }}
        path: {{ .Values.adminKeys.key }}
{{- end }}
{{- end -}}
