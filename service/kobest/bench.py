"""KoBEST benchmark: lm-eval's 10k-request 5-shot KoBEST run through the service beside HFLM in-process.

The GPU host has no data-set stack (lm-eval's task code needs `datasets`), so the run has three steps:

    python -m service.kobest.bench record --out kobest-requests.json.xz        # here: lm-eval builds the requests
    python -m service.kobest.bench run --requests kobest-requests.json.xz --out DIR   # GPU: service, then HFLM
    python -m service.kobest.bench report --requests ... --results DIR/kobest-results.json   # here: metrics

`record` runs lm-eval's own task pipeline (service/kobest) with a model that only records the loglikelihood requests
it is asked; `run` sends those requests through the adapter `polyglot-grpc` to a replica of the real service (Ray
Serve + gRPC) and through lm-eval's HFLM (batch 64) in-process on the same GPU and weights, and times both;
`report` runs lm-eval again with each side's recorded answers, so every metric and per-document prediction is
lm-eval's own, and lists each document whose prediction differs with its margin between choices.
"""
from __future__ import annotations

import argparse
import collections
import json
import lzma
import statistics
import time
from pathlib import Path

from . import TASKS

SHOTS = 5
SEED = 1234  # lm-eval's default few-shot seed


def _open(path: Path, mode: str):
    return lzma.open(path, mode + "t", encoding="utf-8") if str(path).endswith(".xz") else open(path, mode,
                                                                                                encoding="utf-8")


def _evaluate(model, limit: int | None = None):
    import lm_eval

    from . import task_manager

    return lm_eval.simple_evaluate(model=model, tasks=list(TASKS), num_fewshot=SHOTS, limit=limit,
                                   task_manager=task_manager(), log_samples=True, fewshot_random_seed=SEED,
                                   bootstrap_iters=0)


class _Answers:
    """An lm-eval model that answers loglikelihood requests from a table (recording what it was asked)."""

    def __new__(cls, answers: dict | None):
        from lm_eval.api.model import LM

        class Answers(LM):
            def __init__(self):
                super().__init__()
                self.asked: list = []

            def loglikelihood(self, requests, disable_tqdm=False):
                self.asked += requests
                if answers is None:
                    return [(0.0, False)] * len(requests)
                return [tuple(answers[tuple(r.args)]) for r in requests]

            def loglikelihood_rolling(self, requests, disable_tqdm=False):
                raise NotImplementedError("KoBEST has no rolling requests")

            def generate_until(self, requests, disable_tqdm=False):
                raise NotImplementedError("KoBEST has no generation requests")

        return Answers()


def record(out: Path, limit: int | None = None) -> dict:
    """The requests of a 5-shot run of the five tasks, in lm-eval's order, with their mix."""
    lm = _Answers(None)
    _evaluate(lm, limit)
    contexts: dict[str, int] = {}
    requests = []
    for r in lm.asked:
        ctx, cont = r.args
        requests.append([r.task_name, r.doc_id, contexts.setdefault(ctx, len(contexts)), cont])
    per_task = collections.Counter(t for t, *_ in requests)
    docs = {t: len({d for tt, d, *_ in requests if tt == t}) for t in per_task}
    chars = [len(c) for c in contexts]
    mix = {"requests": len(requests), "contexts": len(contexts), "requests_per_task": dict(per_task),
           "documents_per_task": docs, "context_chars": {"mean": statistics.mean(chars), "p50": statistics.median(chars),
                                                         "max": max(chars)}}
    with _open(out, "w") as f:
        json.dump({"shots": SHOTS, "fewshot_seed": SEED, "limit": limit, "mix": mix, "contexts": list(contexts),
                   "requests": requests}, f, ensure_ascii=False)
    return mix


def _load_requests(path: Path) -> tuple[dict, list[tuple[str, str]]]:
    with _open(path, "r") as f:
        data = json.load(f)
    ctx = data["contexts"]
    return data, [(ctx[c], cont) for _, _, c, cont in data["requests"]]


def _instances(pairs):
    from lm_eval.api.instance import Instance

    return [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]


def _through_service(model: str, gpu: bool, pairs, concurrency: list[int], result: dict, save) -> None:
    """One replica of the real service (Ray Serve + gRPC, shipped config); the requests through the adapter at each
    concurrency."""
    import ray
    from ray import serve

    from ..bench import _free_port
    from ..lm_eval import PolyglotGRPC
    from ..serve.launch import deploy, load_config, override, start_ray

    start_ray(None, _free_port(), object_store_mb=1024 if gpu else 256)
    port = _free_port()
    try:
        t = time.perf_counter()
        deploy(override(load_config(), model=model, num_gpus=1 if gpu else 0, grpc_port=port,
                        http_port=_free_port(), replicas=1), timeout_s=900)
        result["service_startup_s"] = time.perf_counter() - t
        for c in concurrency:
            lm = PolyglotGRPC(address=f"127.0.0.1:{port}", concurrency=c)
            t = time.perf_counter()
            answers = lm.loglikelihood(_instances(pairs), disable_tqdm=True)
            dt = time.perf_counter() - t
            result["service"][str(c)] = {"seconds": dt, "requests_per_s": len(pairs) / dt}
            result["answers"][f"service-{c}"] = [list(a) for a in answers]
            print(f"service, concurrency {c}: {dt:.1f} s, {len(pairs) / dt:.0f} requests/s", flush=True)
            save()
    finally:
        serve.shutdown()
        ray.shutdown()


def run(requests_path: Path, out: Path, model: str | None, concurrency: list[int], hflm_batch: int) -> dict:
    """GPU host: the recorded requests through the service at each concurrency, then through HFLM."""
    import gc

    import torch

    from ..bench import _gpu_model, _versions

    data, pairs = _load_requests(requests_path)
    gpu = torch.cuda.is_available()
    model = _gpu_model(model) if gpu or not model else model
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0) if gpu else "CPU"
    result = {"date": time.strftime("%Y-%m-%d"), "device": device, "versions": _versions(),
              "model": model, "mix": data["mix"], "service": {}, "answers": {}}

    def save():
        (out / "kobest-results.json").write_text(json.dumps(result, ensure_ascii=False))

    if concurrency:
        _through_service(model, gpu, pairs, concurrency, result, save)
    gc.collect()

    if hflm_batch:
        from lm_eval.models.huggingface import HFLM

        from ..engine import loader
        from ..engine.config import ModelConfig

        loaded = loader.load(ModelConfig(model=model))
        hf = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=hflm_batch,
                  max_length=loaded.max_context, device=str(loaded.device))
        t = time.perf_counter()
        answers = hf.loglikelihood(_instances(pairs), disable_tqdm=True)  # returns Python floats: synchronized
        dt = time.perf_counter() - t
        result["hflm"] = {"batch": hflm_batch, "seconds": dt, "requests_per_s": len(pairs) / dt}
        result["answers"]["hflm"] = [list(a) for a in answers]
        print(f"HFLM batch {hflm_batch}: {dt:.1f} s", flush=True)
        save()
    return result


def report(requests_path: Path, results_paths: list[Path], out: Path | None = None) -> dict:
    """lm-eval's metrics for each side's answers, agreement document by document, and the speed-up."""
    data, pairs = _load_requests(requests_path)
    res: dict = {}
    for path in results_paths:
        part = json.loads(path.read_text())
        for key in ("service", "answers"):
            part[key] = {**res.get(key, {}), **part[key]}
        res.update(part)
    runs = {}
    for side, answers in res["answers"].items():
        runs[side] = _evaluate(_Answers({p: a for p, a in zip(pairs, answers)}), data.get("limit"))
    ref = runs.get("hflm")
    summary = {"date": res["date"], "device": res["device"], "versions": res["versions"], "mix": res["mix"],
               "hflm": res.get("hflm"), "service": res["service"], "metrics": {}, "agreement": {}}
    for side, r in runs.items():
        summary["metrics"][side] = {t: {k: v for k, v in r["results"][t].items()
                                        if k.split(",")[0] in ("acc", "f1", "acc_norm")} for t in TASKS}
    for side, r in runs.items():
        if ref is None or side == "hflm":
            continue
        a = _compare(r, ref)
        summary["agreement"][side] = a
    if ref is not None:
        for s in res["service"].values():
            s["speedup_vs_hflm"] = res["hflm"]["seconds"] / s["seconds"]
    if out:
        out.write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    return summary


def _compare(ours: dict, ref: dict) -> dict:
    """Per document: the same choice (acc), and where not, HFLM's margin between its best and our choice; the
    log-likelihood differences of every request."""
    docs = agree = 0
    disagreements, diffs = [], []
    for t in TASKS:
        for x, y in zip(ours["samples"][t], ref["samples"][t]):
            assert x["doc_id"] == y["doc_id"]
            lx = [r[0] for r in x["filtered_resps"]]
            ly = [r[0] for r in y["filtered_resps"]]
            diffs += [abs(a - b) for a, b in zip(lx, ly)]
            docs += 1
            px, py = max(range(len(lx)), key=lx.__getitem__), max(range(len(ly)), key=ly.__getitem__)
            if px == py:
                agree += 1
            else:
                disagreements.append({"task": t, "doc_id": x["doc_id"], "hflm_margin": ly[py] - ly[px],
                                      "service_margin": lx[px] - lx[py]})
    return {"documents": docs, "same_prediction": agree, "disagreements": disagreements,
            "loglikelihood_abs_diff": {"max": max(diffs), "mean": statistics.mean(diffs)}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("--out", type=Path, default=Path("kobest-requests.json.xz"))
    r.add_argument("--limit", type=int, help="documents per task (default: every test document)")
    g = sub.add_parser("run")
    g.add_argument("--requests", type=Path, required=True)
    g.add_argument("--out", type=Path, default=Path("bench-results"))
    g.add_argument("--model", help="checkpoint (default: the 5.8B-shape random checkpoint, built if missing)")
    g.add_argument("--concurrency", default="32,128", help="adapter concurrency levels, comma-separated")
    g.add_argument("--hflm-batch", type=int, default=64, help="HFLM's batch size (0: no HFLM run)")
    p = sub.add_parser("report")
    p.add_argument("--requests", type=Path, required=True)
    p.add_argument("--results", type=Path, nargs="+", required=True,
                   help="kobest-results.json of one run, or of several (e.g. the service and HFLM run apart)")
    p.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "record":
        print(json.dumps(record(args.out, args.limit), indent=2, ensure_ascii=False))
    elif args.cmd == "run":
        run(args.requests, args.out, args.model, [int(c) for c in args.concurrency.split(",") if c], args.hflm_batch)
    else:
        s = report(args.requests, args.results, args.out)
        print(json.dumps({k: s[k] for k in ("hflm", "service", "agreement")}, indent=2, ensure_ascii=False)[:4000])


if __name__ == "__main__":
    main()
