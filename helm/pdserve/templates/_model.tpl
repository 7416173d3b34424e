{{/*
The model: which source is set (a PVC, a host path or a URL), its volume, its read-only mount at
/models/model, and the init container that fetches a URL.
*/}}

{{/* Which model source is set: pvc, hostPath, url or "" (the embedded demo model). */}}
{{- define "pdserve.modelSource" -}}
{{- $set := list -}}
{{- range $k, $v := .Values.model -}}
{{- if $v -}}{{- $set = append $set $k -}}{{- end -}}
{{- end -}}
{{- if gt (len $set) 1 -}}
{{- fail (printf "model: set one of pvc, hostPath, url; got %s" (join ", " $set)) -}}
{{- end -}}
{{- first $set | default "" -}}
{{- end -}}

{{- define "pdserve.modelPath" -}}/models/model{{- end -}}

{{- define "pdserve.modelVolume" -}}
{{- $src := include "pdserve.modelSource" . -}}
{{- if eq $src "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ required "model.pvc.claimName is required" .Values.model.pvc.claimName }}
    readOnly: true
{{- else if eq $src "hostPath" }}
- name: model
  hostPath:
    path: {{ required "model.hostPath.path is required" .Values.model.hostPath.path }}
    type: Directory
{{- else if eq $src "url" }}
- name: model
  emptyDir: {}
{{- end }}
{{- end -}}

{{- define "pdserve.modelMount" -}}
{{- $src := include "pdserve.modelSource" . -}}
{{- if $src }}
- name: model
  mountPath: {{ include "pdserve.modelPath" . }}
  readOnly: true
  {{- if and (eq $src "pvc") .Values.model.pvc.subPath }}
  subPath: {{ .Values.model.pvc.subPath }}
  {{- end }}
{{- end }}
{{- end -}}

{{/*
With model.url: an init container fetches the tarball into the pod's emptyDir and unpacks it (tar, tar.gz,
tar.bz2 or tar.xz; one top-level directory is stripped). A marker file makes a restarted init container a
no-op. Plain Python from the image: nothing else is installed at pod start.
*/}}
{{- define "pdserve.modelInit" -}}
{{- if eq (include "pdserve.modelSource" .) "url" }}
- name: fetch-model
  image: {{ include "pdserve.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command:
    - python
    - -c
    - |
      import pathlib, shutil, sys, tarfile, urllib.request
      url, dest = sys.argv[1], pathlib.Path(sys.argv[2])
      done = dest / ".pdserve-fetched"
      if done.exists():
          sys.exit(0)
      tmp = dest / ".partial"
      shutil.rmtree(tmp, ignore_errors=True)
      tmp.mkdir(parents=True)
      with urllib.request.urlopen(url) as r, tarfile.open(fileobj=r, mode="r|*") as tar:
          kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
          tar.extractall(tmp, **kw)
      entries = list(tmp.iterdir())
      root = entries[0] if len(entries) == 1 and entries[0].is_dir() else tmp
      for item in root.iterdir():
          shutil.move(str(item), str(dest / item.name))
      shutil.rmtree(tmp)
      done.touch()
      print(f"fetched {url} into {dest}")
    - {{ .Values.model.url | quote }}
    - {{ include "pdserve.modelPath" . }}
  volumeMounts:
    - name: model
      mountPath: {{ include "pdserve.modelPath" . }}
{{- end }}
{{- end -}}
