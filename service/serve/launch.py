"""Starts Ray (or joins a cluster), Serve with its gRPC proxy, and deploys deploy/serve_config.yaml; behind `make serve`.

    python -m service.serve.launch [--model DIR_OR_HUB_ID] [--grpc-port 9000] [--metrics-port 9100]
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "serve_config.yaml"
log = logging.getLogger("polyglot.launch")


def load_config(path: Path = DEFAULT_CONFIG) -> dict[str, Any]:
    return yaml.safe_load(Path(path).read_text())


def override(
    cfg: dict[str, Any],
    *,
    model: str | None = None,
    num_gpus: float | None = None,
    grpc_port: int | None = None,
    http_port: int | None = None,
    replicas: int | None = None,
    engine: dict[str, dict] | None = None,
) -> dict[str, Any]:
    """A copy of a Serve config with the launch-time settings applied (the single application)."""
    cfg = copy.deepcopy(cfg)
    app = cfg["applications"][0]
    dep = next(d for d in app["deployments"] if d["name"] == "LanguageModel")
    if model is not None:
        # Replicas do not share the launcher's working directory: pass local paths absolute.
        app["args"]["model"]["model"] = os.path.abspath(model) if os.path.isdir(model) else model
    if num_gpus is not None:
        dep.setdefault("ray_actor_options", {})["num_gpus"] = num_gpus
        if num_gpus == 0:
            app["args"]["model"]["device"] = "cpu"
    if grpc_port is not None:
        cfg["grpc_options"]["port"] = grpc_port
    if http_port is not None:
        cfg["http_options"]["port"] = http_port
    if replicas is not None:
        dep.pop("autoscaling_config", None)
        dep["num_replicas"] = replicas
    for section, values in (engine or {}).items():  # also "auth"
        app["args"].setdefault(section, {}).update(values)
    return cfg


def deploy(cfg: dict[str, Any], timeout_s: float = 600) -> None:
    """Start Serve with the config's proxies and deploy its applications on the connected Ray
    cluster; return once every application is RUNNING (raise with Serve's message if one fails)."""
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    from .app import IMPORT_PATH, build_app

    schema = ServeDeploySchema.model_validate(cfg)  # Ray's own validation of the file
    # Public Serve API only (serve.start, Deployment.options, serve.run), so a Ray upgrade keeps it working: the
    # file's proxies and ports, then each application built by its builder with the file's deployment options.
    serve.start(
        proxy_location=schema.proxy_location,
        http_options=schema.http_options.model_dump(exclude_unset=True),
        grpc_options=schema.grpc_options.model_dump(exclude_unset=True),
    )
    for app in schema.applications:
        if app.import_path != IMPORT_PATH:
            raise ValueError(f"this launcher deploys {IMPORT_PATH}, not {app.import_path}")
        options = {d.name: d.model_dump(exclude_unset=True) for d in app.deployments}
        serve.run(build_app(app.args, options), blocking=False, name=app.name, route_prefix=app.route_prefix,
                  logging_config=app.logging_config)
    deadline = time.monotonic() + timeout_s
    names = [a.name for a in schema.applications]
    while True:
        apps = serve.status().applications
        states = {n: apps[n].status if n in apps else "NOT_STARTED" for n in names}
        if all(s == "RUNNING" for s in states.values()):
            return
        failed = [n for n, s in states.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")]
        if failed:
            raise RuntimeError(f"application {failed[0]} failed: {apps[failed[0]].message}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"applications not running after {timeout_s:.0f}s: {states}")
        time.sleep(0.5)


PROXY_MAX_MESSAGE_BYTES = 64 << 20


def start_ray(address: str | None, metrics_port: int, object_store_mb: int) -> None:
    import ray

    if address:
        ray.init(address=address)
        return
    # The proxy's transport limit (Ray's default is 2 GiB): a client cannot make it buffer more than this.
    # Read by the proxy process, which inherits this environment from the Ray started here.
    os.environ.setdefault("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", str(PROXY_MAX_MESSAGE_BYTES))
    ray.init(
        include_dashboard=False,
        object_store_memory=object_store_mb * 1024 * 1024,
        _metrics_export_port=metrics_port,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    ap.add_argument("--model", help="hub id or local directory (default: the config's)")
    ap.add_argument("--num-gpus", default="auto", help="GPUs per replica: auto (1 if the cluster has GPUs, else 0) or a number")
    ap.add_argument("--grpc-port", type=int)
    ap.add_argument("--address", help="join a running Ray cluster (e.g. auto) instead of starting one")
    ap.add_argument("--metrics-port", type=int, default=9100, help="Prometheus port of a Ray started here")
    ap.add_argument("--object-store-mb", type=int, default=512)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import ray
    from ray import serve

    start_ray(args.address, args.metrics_port, args.object_store_mb)
    if args.num_gpus == "auto":
        num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    else:
        num_gpus = float(args.num_gpus)
    cfg = override(load_config(args.config), model=args.model, num_gpus=num_gpus, grpc_port=args.grpc_port)
    app = cfg["applications"][0]
    log.info("deploying %s (num_gpus=%s)", app["args"]["model"]["model"], num_gpus)
    deploy(cfg)
    port = cfg["grpc_options"]["port"]
    log.info("serving polyglot.v1.LanguageModel on localhost:%d (metrics: http://127.0.0.1:%d/metrics); Ctrl-C stops", port, args.metrics_port)

    stop = False

    def _stop(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    try:
        while not stop:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
