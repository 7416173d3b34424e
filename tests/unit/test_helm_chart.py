"""The Helm chart (helm/pdserve), offline: rendered by Helm's own engine (helm-python-sdk), linted, its
schema refusing bad values, every object valid for Kubernetes or its CRD, and the config it hands pdserve
is what pdserve's loader reads. The deployer sidecar's loop runs here against stub `ray`/`pdserve`."""

from __future__ import annotations

import copy
import functools
import hashlib
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml

from pdserve.config import load_config, to_yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "pdserve"
# The CRDs in ../shared/k8s-schemas beside the repository, else the copy of those the chart renders
SCHEMAS = next(
    (d for d in (ROOT.parent / "shared" / "k8s-schemas", ROOT / "tests" / "data" / "k8s-schemas") if d.is_dir()),
    ROOT / "tests" / "data" / "k8s-schemas",
)
K8S_VERSION = "1.33"
CRDS = {
    ("ray.io/v1", "RayCluster"): "ray.io_rayclusters.yaml",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_servicemonitors.yaml",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "monitoring.coreos.com_prometheusrules.yaml",
}
RELEASE, NAMESPACE = "llama", "llm"
MODEL_PATH = "/models/model"
CONFIG_PATH = "/etc/pdserve/config.yaml"
PROMETHEUS = "http://prometheus-operated.monitoring.svc:9090"
GPU_TAINT = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]

OVERRIDES = {
    "default": {},
    "autoscaling": {"pdserve": {"autoscaling": {"enabled": True, "prometheus_url": PROMETHEUS}}},
    "api_key": {"apiKey": {"existingSecret": "llm-api-key", "key": "token"}},
    "key_files": {"apiKeys": {"existingSecret": "llm-tenants"}, "adminKeys": {"existingSecret": "llm-ops",
                                                                            "key": "ops.keys"}},
    "xpyd": {
        "pdserve": {"routing": {"policy": "least_loaded"}, "engine": {"dtype": "bfloat16"}},
        "roles": {
            "prefill": {"replicas": 4, "maxReplicas": 4, "gpus": 8, "nodeSelector": {"pool": "prefill"},
                        "tolerations": GPU_TAINT},
            "decode": {"replicas": 8, "maxReplicas": 8, "gpus": 8, "nodeSelector": {"pool": "decode"},
                       "tolerations": GPU_TAINT},
        },
    },
    "pvc": {"model": {"pvc": {"claimName": "models", "subPath": "Llama-3.1-8B-Instruct"}}},
    "url": {"model": {"url": "https://models.example.com/llama.tar.gz"}},
    "cpu_colocated": {
        "pdserve": {"frontend": {"frontends": 2}, "routing": {"policy": "round_robin"}},
        "roles": {"prefill": {"enabled": False}, "decode": {"enabled": False},
                  "colocated": {"enabled": True, "replicas": 3, "gpus": 0}},
        "model": {"hostPath": {"path": "/data/models/demo"}},
        "rayAuth": {"mode": "disabled"},
        "monitoring": {"enabled": False},
        "gcsFaultTolerance": {"redisAddress": "redis.redis.svc:6379",
                              "redisPassword": {"existingSecret": "redis", "key": "password"}},
    },
}  # fmt: skip


NIXL_OFF = {"pdserve": {"kv": {"nixl": {"progress_thread": False, "ucx_error_handling_mode": "none"}}}}
ONE_DECODE_POD = {"roles": {"prefill": {"enabled": False}, "decode": {"gpus": 8, "maxReplicas": 3}}}


@functools.cache
def chart() -> helm_python.Chart:
    return helm_python.Chart.load(str(CHART))


def render_text(values: dict) -> dict[str, str]:
    return chart().render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


@functools.cache
def _render(case: str) -> tuple[dict, ...]:
    docs = []
    for path, text in render_text(OVERRIDES[case]).items():
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return tuple(docs)


def objects(case: str) -> list[dict]:
    return copy.deepcopy(list(_render(case)))


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name or ''}: {len(found)} rendered"
    return found[0]


def raycluster(case: str) -> dict:
    return one(objects(case), "RayCluster")


def head_containers(rc: dict) -> dict[str, dict]:
    return {c["name"]: c for c in rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"]}


def groups(rc: dict) -> dict[str, dict]:
    return {g["groupName"]: g for g in rc["spec"].get("workerGroupSpecs", [])}


def ray_resources(params: dict) -> dict:
    """`ray start --resources` as KubeRay passes it, through a shell: unquote it, then parse the JSON."""
    (arg,) = shlex.split(params["resources"])
    return json.loads(arg)


def config_text(case: str) -> str:
    return one(objects(case), "ConfigMap", f"{RELEASE}-pdserve-config")["data"]["config.yaml"]


def load(case: str, tmp_path: Path, env: bool = False):
    path = tmp_path / f"{case}.yaml"
    path.write_text(config_text(case))
    return load_config(str(path), env=env)


# ---- validation: built-in kinds by kubernetes-validate, custom kinds by their CRD's schema ----------------


def _strict(schema):
    """A CRD's OpenAPI v3 schema as a JSON Schema that, like `kubectl --validate=strict`, refuses unknown
    fields: objects listing their properties allow no others unless marked preserve-unknown-fields."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out and "type" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(api_version: str, kind: str) -> jsonschema.Draft4Validator:
    if not SCHEMAS.is_dir():
        pytest.fail(f"CRD schemas not found at {SCHEMAS} (see its README): custom kinds cannot be validated")
    crd = yaml.safe_load((SCHEMAS / CRDS[(api_version, kind)]).read_text())
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    # OpenAPI v3.0 schemas are draft 4 in what matters here (boolean exclusiveMinimum)
    return jsonschema.Draft4Validator(_strict(entry["schema"]["openAPIV3Schema"]))


def validate(obj: dict) -> None:
    """Raises (jsonschema or kubernetes_validate ValidationError) if `obj` is not a valid object."""
    key = (obj["apiVersion"], obj["kind"])
    if key in CRDS:
        crd_validator(*key).validate(obj)
    else:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_crd_schemas_are_present():
    assert SCHEMAS.is_dir(), f"{SCHEMAS} is missing: the KubeRay and prometheus-operator CRDs live there"
    for file in CRDS.values():
        assert (SCHEMAS / file).is_file(), f"{SCHEMAS / file} is missing"


@pytest.mark.parametrize("case", sorted(OVERRIDES))
def test_every_rendered_object_is_valid(case):
    objs = objects(case)
    kinds = {o["kind"] for o in objs}
    assert {"RayCluster", "ConfigMap", "Service"} <= kinds
    if OVERRIDES[case].get("monitoring", {}).get("enabled", True):
        assert {"ServiceMonitor", "PodMonitor", "PrometheusRule"} <= kinds
    for obj in objs:
        validate(obj)


def test_broken_objects_fail_validation():
    objs = objects("xpyd")
    rc = one(objs, "RayCluster")
    rc["spec"]["workerGroupSpecs"][0]["replicas"] = "x"
    with pytest.raises(jsonschema.ValidationError, match="'x' is not of type 'integer'"):
        validate(rc)
    rc = one(objects("xpyd"), "RayCluster")
    rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePulPolicy"] = "Always"  # a typo
    with pytest.raises(jsonschema.ValidationError, match="imagePulPolicy"):
        validate(rc)
    svc = one(objs, "Service", f"{RELEASE}-pdserve-api")
    svc["spec"]["ports"][0]["port"] = "eighty"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(svc)
    rule = one(objs, "PrometheusRule")
    del rule["spec"]["groups"][0]["rules"][0]["expr"]
    with pytest.raises(jsonschema.ValidationError, match="'expr' is a required property"):
        validate(rule)
    monitor = one(objs, "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["interval"] = "five seconds"
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor)


# ---- Helm: lint and the values schema ---------------------------------------------------------------------


def test_lint_passes():
    for values in ({}, OVERRIDES["xpyd"], OVERRIDES["cpu_colocated"]):
        report = helm_python.chart.lint(str(CHART), values, strict=True, kube_version=f"v{K8S_VERSION}.0")
        errors = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error
        assert not report["errors"] and not errors, report


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"roles": {"decode": {"replicas": -1}}}, "/roles/decode/replicas"),
        ({"roles": {"decode": {"replica": 2}}}, "'replica'"),
        ({"roles": {"prefill": {"gpus": "eight"}}}, "/roles/prefill/gpus"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"pdserve": {"engin": {"dtype": "bfloat16"}}}, "'engin'"),
        ({"pdserve": {"pools": {"decode": 3}}}, "'pools'"),
        ({"pdserve": {"frontend": {"api_key": "sk-plain"}}}, "/pdserve/frontend/api_key"),
        ({"apiKey": {"value": "sk-plain"}}, "'value'"),
        ({"pdserve": {"frontend": {"api_keys": ["sk-plain"]}}}, "/pdserve/frontend/api_keys"),
        ({"pdserve": {"frontend": {"admin_keys": ["sk-plain"]}}}, "/pdserve/frontend/admin_keys"),
        ({"pdserve": {"frontend": {"admin_keys_file": "/keys"}}}, "/pdserve/frontend/admin_keys_file"),
        ({"adminKeys": {"existingSecret": "ops", "key": "../etc"}}, "/adminKeys/key"),
        ({"pdserve": {"autoscaling": {"enabled": True}}}, "prometheus_url"),
        ({"model": {"pvc": {"claimName": "m"}, "url": "https://x/m.tar"}}, "/model"),
        ({"pdserve": {"name": "two words"}}, "/pdserve/name"),
        ({"rayAuth": {"mode": "password"}}, "/rayAuth/mode"),
        ({"pdserve": {"kv": {"nixl": {"progres_thread": True}}}}, "'progres_thread'"),
        ({"pdserve": {"kv": {"nixl": {"ucx_error_handling_mode": "on"}}}}, "/pdserve/kv/nixl/ucx_error_handling_mode"),
    ],
)
def test_schema_refuses_bad_values_naming_the_key(values, named):
    with pytest.raises(helm_python.HelmValuesError) as e:
        render_text(values)
    assert named in str(e.value)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"roles": {"decode": {"enabled": False}}}, "need at least one decode or colocated worker"),
        ({"roles": {"decode": {"replicas": 9}}}, "replicas 9 is above maxReplicas 8"),
        ({"roles": {"decode": {"gpus": 0}}}, "one device kind"),
        ({"pdserve": {"controller": {"metrics_port": 0}}}, "metrics_port 0"),
        ({"pdserve": {"frontend": {"frontends": 8}}}, "head.cpu 8"),
        (NIXL_OFF, "progress_thread: false, but the workers can span 2 pods"),
        ({**ONE_DECODE_POD, "pdserve": {**NIXL_OFF["pdserve"], **OVERRIDES["autoscaling"]["pdserve"]}}, "span 3 pods"),
    ],
)
def test_inconsistent_values_fail_with_a_reason(values, message):
    with pytest.raises(helm_python.HelmError, match=message):
        render_text(values)


# ---- what the override sets do -----------------------------------------------------------------------------


def test_default_cluster_layout():
    rc = raycluster("default")
    assert "enableInTreeAutoscaling" not in rc["spec"]
    head = rc["spec"]["headGroupSpec"]
    assert ray_resources(head["rayStartParams"]) == {"pdserve_head": 100}
    assert head["rayStartParams"]["num-gpus"] == "0"
    ports = {p["name"]: p["containerPort"] for p in head_containers(rc)["ray-head"]["ports"]}
    assert ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "metrics": 8080, "api": 8000,
                     "ctrl-metrics": 9400}  # fmt: skip
    assert list(head_containers(rc)) == ["ray-head", "pdserve-deployer"]  # KubeRay starts Ray in the first
    assert sorted(groups(rc)) == ["decode", "prefill"]
    for role, group in groups(rc).items():
        assert ray_resources(group["rayStartParams"]) == {f"pdserve_{role}": 1}
    api = one(objects("default"), "Service", f"{RELEASE}-pdserve-api")
    assert api["spec"]["selector"] == {"ray.io/cluster": rc["metadata"]["name"], "ray.io/node-type": "head"}
    assert [(p["port"], p["targetPort"]) for p in api["spec"]["ports"]] == [(8000, "api")]


def test_autoscaling_turns_on_kuberay_autoscaler(tmp_path):
    rc = raycluster("autoscaling")
    assert rc["spec"]["enableInTreeAutoscaling"] is True
    env = {e["name"] for e in rc["spec"]["autoscalerOptions"]["env"]}
    assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} <= env  # the autoscaler talks to the GCS too
    cfg = load("autoscaling", tmp_path)
    assert cfg.autoscaling.enabled and cfg.autoscaling.prometheus_url == PROMETHEUS
    # pdserve's bounds are the worker groups' bounds, in workers
    assert (cfg.autoscaling.min_prefill, cfg.autoscaling.max_prefill) == (0, 8)
    assert (cfg.autoscaling.min_decode, cfg.autoscaling.max_decode) == (1, 8)


def test_api_key_comes_from_the_secret_only(tmp_path, monkeypatch):
    deployer = head_containers(raycluster("api_key"))["pdserve-deployer"]
    (entry,) = [e for e in deployer["env"] if e["name"] == "PDSERVE_FRONTEND__API_KEY"]
    assert entry == {
        "name": "PDSERVE_FRONTEND__API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "llm-api-key", "key": "token"}},
    }
    assert "api_key" not in config_text("api_key")
    # the variable is the one pdserve reads: set it as the kubelet would from the Secret
    for var in [v for v in os.environ if v.startswith("PDSERVE_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv(entry["name"], "sk-from-secret")
    assert load("api_key", tmp_path, env=True).frontend.api_key == "sk-from-secret"
    assert "PDSERVE_FRONTEND__API_KEY" not in json.dumps(objects("default"))


def test_key_files_come_from_secrets_mounted_where_the_frontends_read_them(tmp_path, monkeypatch):
    rc = raycluster("key_files")
    pod = rc["spec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m for m in head_containers(rc)["ray-head"]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    cfg = load("key_files", tmp_path)
    files = {"api-keys": cfg.frontend.api_keys_file, "admin-keys": cfg.frontend.admin_keys_file}
    assert files == {"api-keys": "/etc/pdserve-keys/api/api-keys", "admin-keys": "/etc/pdserve-keys/admin/ops.keys"}
    for name, path in files.items():
        # mounted whole, read-only (a subPath mount never sees a rotated Secret), the file where the config says
        assert mounts[name]["readOnly"] and "subPath" not in mounts[name]
        (item,) = volumes[name]["secret"]["items"]
        assert f"{mounts[name]['mountPath']}/{item['path']}" == path
    assert volumes["api-keys"]["secret"]["secretName"] == "llm-tenants"
    assert volumes["admin-keys"]["secret"]["secretName"] == "llm-ops"
    assert "pdserve-deployer" not in {c["name"] for c in pod["containers"] if "api-keys" in str(c)}
    assert "api-keys" not in str(raycluster("default"))
    # the frontend's key policy reads the files at those paths: written as the kubelet would, then rotated
    from pdserve.api.auth import Auth

    root = tmp_path / "keys"
    for name, path in files.items():
        (root / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (root / path.lstrip("/")).write_text("# tenants\nsk-a tenant=acme\n" if name == "api-keys" else "ops-1\n")
    local = {"api_keys_file": files["api-keys"], "admin_keys_file": files["admin-keys"]}
    fe = cfg.frontend.model_copy(update={k: str(root / v.lstrip("/")) for k, v in local.items()})
    auth = Auth.from_config(fe)
    assert auth.api.configured and auth.admin.configured
    digest = lambda key: hashlib.sha256(key.encode()).digest()  # noqa: E731
    assert auth.api.match(digest("sk-a")).salt is not None and auth.api.match(digest("ops-1")) is None
    assert auth.admin.match(digest("ops-1")) is not None and auth.admin.match(digest("sk-a")) is None


def test_xpyd_on_labelled_gpu_nodes(tmp_path):
    rc = raycluster("xpyd")
    gs = groups(rc)
    for role, pods, pool in (("prefill", 4, "prefill"), ("decode", 8, "decode")):
        g = gs[role]
        assert (g["replicas"], g["maxReplicas"]) == (pods, pods)
        spec = g["template"]["spec"]
        assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
        assert spec["nodeSelector"] == {"pool": pool} and spec["tolerations"] == GPU_TAINT
        assert ray_resources(g["rayStartParams"]) == {f"pdserve_{role}": 8}
    cfg = load("xpyd", tmp_path)
    assert (cfg.pools.prefill, cfg.pools.decode, cfg.pools.colocated) == (32, 64, 0)
    assert cfg.pools.resources == {"prefill": {"pdserve_prefill": 1.0}, "decode": {"pdserve_decode": 1.0}}
    assert cfg.engine.device == "cuda" and cfg.engine.dtype == "bfloat16"
    assert cfg.routing.policy == "least_loaded"
    assert cfg.frontend.resources == {"pdserve_head": 1.0} and cfg.controller.resources == {"pdserve_head": 1.0}
    assert cfg.name == RELEASE


def test_nixl_runs_its_progress_thread_between_pods(tmp_path):
    """Workers in several pods pull KV over the network: the chart turns on NIXL's progress thread and UCX's
    peer mode (pdserve's defaults, both off, suit one host), and lets them be off only where the workers
    cannot span pods, or with another transport."""
    for case in OVERRIDES:
        nixl = load(case, tmp_path).kv.nixl
        assert nixl.progress_thread and nixl.ucx_error_handling_mode == "peer", case
    nccl = {"pdserve": {"kv": {**NIXL_OFF["pdserve"]["kv"], "transport": "nccl"}}}
    for values in ({**ONE_DECODE_POD, **NIXL_OFF}, nccl):
        text = yaml.safe_load(render_text(values)["pdserve/templates/configmap.yaml"])["data"]["config.yaml"]
        assert yaml.safe_load(text)["kv"]["nixl"] == NIXL_OFF["pdserve"]["kv"]["nixl"]


def test_schema_of_kv_nixl_is_pdserves():
    """The chart's schema types kv.nixl's keys (so a typo fails the install); they are pdserve's keys."""
    from typing import get_args

    from pdserve.config import NixlConfig

    schema = json.loads((CHART / "values.schema.json").read_text())
    nixl = schema["properties"]["pdserve"]["properties"]["kv"]["properties"]["nixl"]["properties"]
    assert set(nixl) == set(NixlConfig.model_fields)
    modes = get_args(NixlConfig.model_fields["ucx_error_handling_mode"].annotation)
    assert nixl["ucx_error_handling_mode"]["enum"] == list(modes)


def _pod_specs(rc: dict) -> list[dict]:
    return [rc["spec"]["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in groups(rc).values()]


def test_model_from_a_pvc(tmp_path):
    rc = raycluster("pvc")
    for spec in _pod_specs(rc):
        (vol,) = [v for v in spec["volumes"] if v["name"] == "model"]
        assert vol["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
        for c in spec["containers"]:  # the deployer reads the model's name too
            (mount,) = [m for m in c["volumeMounts"] if m["name"] == "model"]
            assert mount == {"name": "model", "mountPath": MODEL_PATH, "readOnly": True,
                             "subPath": "Llama-3.1-8B-Instruct"}  # fmt: skip
    assert load("pvc", tmp_path).engine.model == MODEL_PATH
    assert load("default", tmp_path).engine.model is None  # no source: the embedded demo model


def test_model_from_a_url_is_fetched_by_an_init_container(tmp_path):
    rc = raycluster("url")
    for spec in _pod_specs(rc):
        (init,) = spec["initContainers"]
        assert init["name"] == "fetch-model" and "https://models.example.com/llama.tar.gz" in init["command"]
        assert init["volumeMounts"] == [{"name": "model", "mountPath": MODEL_PATH}]
        assert {"name": "model", "emptyDir": {}} in spec["volumes"]
    assert load("url", tmp_path).engine.model == MODEL_PATH


def test_fetch_model_script_unpacks_a_tarball(tmp_path):
    """The init container's own command, run here on a file:// URL: one top-level directory is stripped,
    and a second run (a restarted init container) leaves the directory alone."""
    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in (("llama/config.json", b"{}"), ("llama/tokenizer.json", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    values = {"model": {"url": archive.as_uri()}}
    docs = [d for d in yaml.safe_load_all(render_text(values)["pdserve/templates/raycluster.yaml"]) if d]
    command = docs[0]["spec"]["headGroupSpec"]["template"]["spec"]["initContainers"][0]["command"]
    assert command[:2] == ["python", "-c"] and command[3:] == [archive.as_uri(), MODEL_PATH]
    dest = tmp_path / "model"
    dest.mkdir()
    for _ in range(2):
        subprocess.run([sys.executable, "-c", command[2], command[3], str(dest)], check=True, timeout=60)
        assert sorted(p.name for p in dest.iterdir()) == [".pdserve-fetched", "config.json", "tokenizer.json"]


def test_cpu_colocated_with_frontends_and_gcs_fault_tolerance(tmp_path):
    objs = objects("cpu_colocated")
    rc = one(objs, "RayCluster")
    assert sorted(groups(rc)) == ["colocated"]
    limits = groups(rc)["colocated"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in limits
    assert rc["spec"]["gcsFaultToleranceOptions"] == {
        "redisAddress": "redis.redis.svc:6379",
        "redisPassword": {"valueFrom": {"secretKeyRef": {"name": "redis", "key": "password"}}},
    }
    for c in head_containers(rc).values():
        assert {"name": "RAY_AUTH_MODE", "value": "disabled"} in c["env"]
    assert not [o for o in objs if o["kind"] in ("ServiceMonitor", "PodMonitor", "PrometheusRule", "Secret")]
    api = one(objs, "Service", f"{RELEASE}-pdserve-api")
    assert [p["port"] for p in api["spec"]["ports"]] == [8000, 8001]  # frontend i on port + i
    cfg = load("cpu_colocated", tmp_path)
    assert (cfg.pools.prefill, cfg.pools.decode, cfg.pools.colocated) == (0, 0, 3)
    assert cfg.pools.resources == {"colocated": {"pdserve_colocated": 1.0}}
    assert cfg.engine.device == "cpu" and cfg.engine.model == MODEL_PATH
    assert cfg.routing.policy == "round_robin" and cfg.frontend.frontends == 2


def test_monitoring_objects():
    objs = objects("default")
    monitor = one(objs, "ServiceMonitor")
    metrics = one(objs, "Service", f"{RELEASE}-pdserve-metrics")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= metrics["metadata"]["labels"].items()
    ports = {p["name"] for p in metrics["spec"]["ports"]}
    assert {"api", "ctrl-metrics", "metrics"} == ports
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"api", "ctrl-metrics"}
    for e in monitor["spec"]["endpoints"]:
        assert e["interval"] == "5s" and e["path"] == "/metrics"
        assert {"targetLabel": "job", "replacement": "pdserve"} in e["relabelings"]  # what the rules expect
    pods = one(objs, "PodMonitor")
    assert pods["spec"]["selector"]["matchLabels"] == {"ray.io/cluster": f"{RELEASE}-pdserve"}
    assert pods["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    rules = yaml.safe_load((ROOT / "deploy" / "rules" / "pdserve.rules.yml").read_text())
    assert one(objs, "PrometheusRule")["spec"]["groups"] == rules["groups"]
    dashboards = one(objs, "ConfigMap", f"{RELEASE}-pdserve-dashboards")
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads((ROOT / "dashboards" / "pdserve.json").read_text())
    assert json.loads(dashboards["data"]["pdserve.json"]) == dashboard


def test_notes_tell_how_to_reach_the_api():
    notes = render_text(OVERRIDES["api_key"])["pdserve/templates/NOTES.txt"]
    assert f"port-forward svc/{RELEASE}-pdserve-api 8000" in notes and "/v1/models" in notes
    assert "Authorization: Bearer $KEY" in notes and "secret llm-api-key" in notes
    assert f"pdserve status --name {RELEASE}" in notes
    assert "Authorization" not in render_text({})["pdserve/templates/NOTES.txt"]


def test_chart_copies_equal_the_originals():
    pairs = [
        (CHART / "files" / "pdserve.rules.yml", ROOT / "deploy" / "rules" / "pdserve.rules.yml"),
        (CHART / "files" / "dashboards" / "pdserve.json", ROOT / "dashboards" / "pdserve.json"),
    ]
    for copy_, original in pairs:
        again = "copy it again (helm/pdserve/README.md, Monitoring)"
        assert copy_.read_bytes() == original.read_bytes(), f"{copy_} differs from {original}: {again}"


# ---- what the chart tells pdserve is what pdserve reads ------------------------------------------------------


@pytest.mark.parametrize("case", sorted(OVERRIDES))
def test_pdserve_config_reads_the_rendered_file(case, tmp_path, monkeypatch, capsys):
    """`pdserve config --config FILE` (the CLI's own path) accepts the file and prints the same config
    the loader builds."""
    from pdserve.cli import main

    for var in [v for v in os.environ if v.startswith("PDSERVE_")]:
        monkeypatch.delenv(var)
    path = tmp_path / "config.yaml"
    path.write_text(config_text(case))
    assert main(["config", "--config", str(path)]) == 0
    assert capsys.readouterr().out == to_yaml(load_config(str(path)))


def test_deployer_runs_pdserve_serve_on_the_mounted_config():
    rc = raycluster("default")
    deployer = head_containers(rc)["pdserve-deployer"]
    command = " ".join(deployer["command"] + deployer["args"])
    for part in ("pdserve serve", "--address 127.0.0.1:6379", "--detach", f"--config {CONFIG_PATH}",
                 'pdserve status --name "$name"', 'name="llama"'):  # fmt: skip
        assert part in command
    # the path it names is the ConfigMap's key, mounted read-only
    (mount,) = [m for m in deployer["volumeMounts"] if m["name"] == "pdserve-config"]
    (volume,) = [v for v in rc["spec"]["headGroupSpec"]["template"]["spec"]["volumes"] if v["name"] == "pdserve-config"]
    configmap = one(objects("default"), "ConfigMap", volume["configMap"]["name"])
    assert f"{mount['mountPath']}/config.yaml" == CONFIG_PATH and "config.yaml" in configmap["data"]
    # it joins Ray through the head's raylet: same /tmp/ray as the Ray container
    mounts = [m for c in head_containers(rc).values() for m in c["volumeMounts"]]
    assert [m["name"] for m in mounts if m["mountPath"] == "/tmp/ray"] == ["ray-logs", "ray-logs"]


STUB_PDSERVE = """#!/bin/bash
echo "$*" >> "$STUB_DIR/calls"
case "$1" in
  status) [ -e "$STUB_DIR/running" ] ;;
  serve) touch "$STUB_DIR/running" ;;
esac
"""


def _wait_for(predicate, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_deployer_loop_deploys_redeploys_and_scales(tmp_path):
    """The sidecar's script with stub `ray` and `pdserve`: it deploys once, deploys again when the
    deployment is gone (a head restart without GCS fault tolerance), and applies changed pool sizes."""
    values = {**OVERRIDES["xpyd"], "deployer": {"intervalSeconds": 1}}
    rc = [d for d in yaml.safe_load_all(render_text(values)["pdserve/templates/raycluster.yaml"]) if d][0]
    config = tmp_path / "config.yaml"
    config.write_text(config_text("xpyd"))
    script = head_containers(rc)["pdserve-deployer"]["args"][0].replace(CONFIG_PATH, str(config))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("pdserve", STUB_PDSERVE), ("ray", "#!/bin/bash\nexit 0\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)
    calls = tmp_path / "calls"
    calls.touch()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_DIR": str(tmp_path)}
    proc = subprocess.Popen(["/bin/bash", "-c", script], env=env, stdout=subprocess.DEVNULL, start_new_session=True)
    lines = lambda: calls.read_text().splitlines()
    try:
        _wait_for(lambda: any(c.startswith("status") for c in lines()[1:]))  # deployed, then looked again
        assert [c for c in lines() if c.startswith("serve")] == [
            f"serve --config {config} --address 127.0.0.1:6379 --detach"
        ]
        config.write_text(config.read_text().replace("decode: 64", "decode: 80"))  # helm upgrade: 10 pods
        _wait_for(lambda: any(c.startswith("scale") for c in lines()))
        assert [c for c in lines() if c.startswith("scale")] == [
            "scale --name llama --address 127.0.0.1:6379 --prefill 32 --decode 80 --colocated 0"
        ]
        (tmp_path / "running").unlink()  # the head restarted and Ray's state is gone
        _wait_for(lambda: len([c for c in lines() if c.startswith("serve")]) == 2)
        assert len([c for c in lines() if c.startswith("scale")]) == 1
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
