{{/*
The pdserve-deployer sidecar of the head pod. It keeps the deployment `pdserve.deploymentName` present in the
cluster: once Ray answers on 127.0.0.1:6379 it deploys it if `pdserve status` finds none (first start, or a
head restart that lost Ray's state), and applies changed pool sizes of /etc/pdserve/config.yaml (a `helm
upgrade` of roles.*.replicas) with `pdserve scale`. A `serve` racing a running deployment fails with
DeploymentExists, so the loop can never start a second copy.
*/}}

{{- define "pdserve.deployerScript" -}}
name={{ include "pdserve.deploymentName" . | quote }}
pools() {
  python -c 'import sys, yaml; p = yaml.safe_load(open(sys.argv[1]))["pools"]; print(" ".join(f"--{r} {p[r]}" for r in ("prefill", "decode", "colocated")))' /etc/pdserve/config.yaml
}
applied=""
while true; do
  if ray health-check --address 127.0.0.1:6379 >/dev/null 2>&1; then
    if pdserve status --name "$name" --address 127.0.0.1:6379 >/dev/null 2>&1; then
      wanted=$(pools)
      if [ -z "$applied" ]; then
        applied=$wanted  # running before this sidecar started: keep its sizes (an autoscaler's or an earlier apply's)
      elif [ "$wanted" != "$applied" ]; then
        echo "pdserve-deployer: pool sizes changed: pdserve scale $wanted"
        pdserve scale --name "$name" --address 127.0.0.1:6379 $wanted && applied=$wanted
      fi
    else
      echo "pdserve-deployer: no deployment $name in the Ray cluster: deploying it"
      wanted=$(pools)
      pdserve serve --config /etc/pdserve/config.yaml --address 127.0.0.1:6379 --detach && applied=$wanted
    fi
  fi
  sleep {{ .Values.deployer.intervalSeconds }}
done
{{- end -}}

{{- define "pdserve.deployerContainer" -}}
- name: pdserve-deployer
  image: {{ include "pdserve.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["/bin/bash", "-c"]
  args:
    - |-
      {{- include "pdserve.deployerScript" . | nindent 6 }}
  env:
    {{- include "pdserve.rayAuthEnv" . | nindent 4 }}
    {{- if .Values.apiKey.existingSecret }}
    - name: PDSERVE_FRONTEND__API_KEY
      valueFrom:
        secretKeyRef:
          name: {{ .Values.apiKey.existingSecret }}
          key: {{ .Values.apiKey.key }}
    {{- end }}
  resources:
    requests:
      cpu: {{ .Values.deployer.cpu | quote }}
      memory: {{ .Values.deployer.memory | quote }}
    limits:
      memory: {{ .Values.deployer.memory | quote }}
  volumeMounts:
    - name: pdserve-config
      mountPath: /etc/pdserve
      readOnly: true
    # Ray's sockets and session files: a driver joins through the raylet of its own node.
    - name: ray-logs
      mountPath: /tmp/ray
    {{- with include "pdserve.modelMount" . | trim }}{{ . | nindent 4 }}{{ end }}
{{- end -}}
