"""The deployment manifests: loadable, and the fields that matter agree with the Serve config `make serve` uses."""
from __future__ import annotations

import yaml

from conftest import ROOT
from service.serve.launch import DEFAULT_CONFIG, load_config

K8S = ROOT / "deploy" / "k8s"


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
    dep = app.deployments[0]
    assert dep.max_ongoing_requests >= 256  # Serve's default of 5 would cap a batch at 5
    assert dep.ray_actor_options.num_gpus == 1
    auto = dict(dep.autoscaling_config)
    assert auto["max_replicas"] >= auto["min_replicas"] >= 1


def test_gpu_workers_probes_and_ports():
    rs = yaml.safe_load((K8S / "rayservice.yaml").read_text())
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == "2.60.0"
    (group,) = cluster["workerGroupSpecs"]
    max_replicas = load_config()["applications"][0]["deployments"][0]["autoscaling_config"]["max_replicas"]
    assert group["maxReplicas"] == max_replicas  # one GPU pod per replica
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert worker["readinessProbe"]["grpc"]["port"] == 9000 and worker["livenessProbe"]["grpc"]["port"] == 9000
    assert {"containerPort": 9000, "name": "grpc"} in worker["ports"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"containerPort": 9000, "name": "grpc"} in head["ports"]
    assert cluster["headGroupSpec"]["rayStartParams"]["metrics-export-port"] == "8080"
    assert group["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_grpc_service_and_podmonitor():
    svc = yaml.safe_load((K8S / "grpc-service.yaml").read_text())
    assert svc["spec"]["ports"][0]["port"] == 9000 and svc["spec"]["ports"][0]["appProtocol"] == "grpc"
    pm = yaml.safe_load((K8S / "podmonitor.yaml").read_text())
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


def test_dockerfile_pins_and_runs_as_non_root():
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "torch==2.13.0" in text and "USER ray" in text and "grpc_tools.protoc" in text


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


def test_tls_ingress_forwards_grpc_to_the_service():
    ing = yaml.safe_load((K8S / "tls-ingress.yaml").read_text())
    svc = yaml.safe_load((K8S / "grpc-service.yaml").read_text())
    assert ing["kind"] == "Ingress"
    assert ing["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    (tls,) = ing["spec"]["tls"]
    (rule,) = ing["spec"]["rules"]
    assert tls["secretName"] and rule["host"] in tls["hosts"]
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": svc["metadata"]["name"], "port": {"number": svc["spec"]["ports"][0]["port"]}}


def test_every_proxy_gets_the_message_size_limit():
    from service.serve.launch import PROXY_MAX_MESSAGE_BYTES

    cluster = yaml.safe_load((K8S / "rayservice.yaml").read_text())["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    for pod in pods:
        env = {e["name"]: e.get("value") for e in pod["template"]["spec"]["containers"][0]["env"]}
        assert int(env["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"]) == PROXY_MAX_MESSAGE_BYTES
