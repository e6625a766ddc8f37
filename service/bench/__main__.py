"""The benchmark: the service end to end (async gRPC client -> Ray Serve -> model) beside in-process baselines on the same model.

    python -m service.bench            # GPU: 5.8B-shape nf4 checkpoint (random weights unless --model is given)
    python -m service.bench --quick    # CPU: the tiny model, same code path, numbers meaningless

Writes one JSON file and prints one Markdown table: each service figure beside its baseline and the ratio.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import time
from pathlib import Path

import torch

from .baselines import baseline_generate, baseline_hflm, baseline_raw_forward, baseline_traffic
from .check import WrongOutput, check_outputs
from .driver import run_service
from .kvsim import kv_fragmentation
from .profiles import (attention_sweep, autoscale_run, engine_traffic, gemm4bit_ptx, gemm4bit_sweep, profile_decode, profile_prefill,
                       profile_score)
from .report import frontend_hop, hop_table, table, traffic_table, versions
from .workloads import BenchConfig, gpu_model, make_workloads, traffic_rows

def _engine_settings(items: list[str]) -> dict:
    """--engine SECTION.KEY=JSON items as {section: {key: value}}."""
    settings: dict = {}
    for item in items:
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        settings.setdefault(section, {})[name] = json.loads(value)
    return settings


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m service.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU, tiny model, small workloads (the code path, not numbers)")
    ap.add_argument("--model", help="checkpoint dir or hub id (default: the 5.8B-shape random checkpoint / tiny)")
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--skip-baselines", action="store_true")
    ap.add_argument("--skip-score", action="store_true", help="service: Generate workloads only")
    ap.add_argument("--traffic-streams", type=int, help="streams of the real-traffic rows (0: none)")
    ap.add_argument("--gen-concurrency", help="comma-separated stream counts (default 1,8,32,64,128)")
    ap.add_argument("--gen-tokens", type=int, help="new tokens of each benchmark-path stream (default 128)")
    ap.add_argument("--frontend-ab", action="store_true",
                    help="also run the Generate rows through the opt-in Frontend deployment: the extra hop's cost")
    ap.add_argument("--gen-timeout", type=float, help="deadline of each Generate stream, seconds")
    ap.add_argument("--open-loop-rates", help="comma-separated Poisson arrival rates, requests/s ('' : none)")
    ap.add_argument("--goodput-probes", type=int,
                    help="open-loop runs after those rates that bisect between the highest passing and lowest failing "
                         "rate (default 3; 0: none)")
    ap.add_argument("--open-loop-s", type=float, help="seconds of arrivals at each open-loop rate")
    ap.add_argument("--beside-streams", type=int, help="sampled streams beside the Score flood (0: none)")
    ap.add_argument("--pairs", type=int, help="independent Score pairs")
    ap.add_argument("--mc-questions", type=int, help="multiple-choice questions")
    ap.add_argument("--engine", action="append", default=[], metavar="SECTION.KEY=JSON",
                    help="engine setting for the service under test, e.g. model.cudnn_attention=true (repeatable)")
    ap.add_argument("--profile-decode", action="store_true", help="GPU: time and profile the decode step only")
    ap.add_argument("--profile-prefill", action="store_true", help="GPU: time and profile the prefill step only")
    ap.add_argument("--gemm4bit-sweep", action="store_true",
                    help="GPU: engine/gemm4bit.py's 4-bit matmul against the dense copies and bitsandbytes")
    ap.add_argument("--gemm4bit-ptx", action="store_true",
                    help="CPU: the 4-bit matmul's K loop compiled for sm_90 without a GPU, instructions per weight")
    ap.add_argument("--decode-prompt", type=int, default=32, help="--profile-decode: tokens in each row's cache")
    ap.add_argument("--attention-sweep", action="store_true",
                    help="GPU: the fused decode attention alone at the real-traffic shape, over its launch settings")
    ap.add_argument("--attention-kv", default="float16,int8",
                    help="--attention-sweep: the KV-cache dtypes to sweep, comma-separated")
    ap.add_argument("--engine-traffic", action="store_true",
                    help="the real-traffic rows in-process on the Engine (no Ray, no gRPC), with step times and a "
                         "cProfile of the model thread")
    ap.add_argument("--kv-fragmentation", action="store_true",
                    help="CPU: contiguous KV ranges against a paged cache, admission replayed without a model")
    ap.add_argument("--autoscale", action="store_true", help="multi-GPU: scale up under load and back down")
    ap.add_argument("--profile-score", action="store_true", help="Score in-process: throughput, kernels, invariance")
    args = ap.parse_args(argv)
    if args.profile_score:
        if args.quick:
            from ..engine.tiny import ensure
            return profile_score(args.model or str(ensure(Path(".models/tiny"))), Path(args.out),
                                 BenchConfig.quick_config(""))
        return profile_score(gpu_model(args.model), Path(args.out))
    if args.kv_fragmentation:
        return kv_fragmentation(Path(args.out))
    if args.autoscale:
        return autoscale_run(gpu_model(args.model), Path(args.out), max_replicas=max(2, torch.cuda.device_count()))
    if args.profile_decode:
        return profile_decode(gpu_model(args.model), Path(args.out), prompt_len=args.decode_prompt)
    if args.gemm4bit_ptx:
        return gemm4bit_ptx(Path(args.out))
    if args.gemm4bit_sweep:
        return gemm4bit_sweep(gpu_model(args.model), Path(args.out))
    if args.profile_prefill:
        return profile_prefill(gpu_model(args.model), Path(args.out))
    if args.attention_sweep:
        return attention_sweep(Path(args.out), kv_dtypes=tuple(args.attention_kv.split(",")))
    if args.engine_traffic:
        if args.quick:
            from ..engine.tiny import ensure
            return engine_traffic(args.model or str(ensure(Path(".models/tiny"))), Path(args.out),
                                  BenchConfig.quick_config(""))
        return engine_traffic(gpu_model(args.model), Path(args.out),
                              BenchConfig(model="", engine=_engine_settings(args.engine)))

    if args.quick:
        from ..engine.tiny import ensure
        model = args.model or str(ensure(Path(".models/tiny")))
        cfg = BenchConfig.quick_config(model)
    else:
        cfg = BenchConfig()
        model = gpu_model(args.model)
    cfg.out = args.out
    if args.gen_concurrency:
        cfg.gen_concurrency = tuple(int(x) for x in args.gen_concurrency.split(","))
    if args.gen_tokens:
        cfg.gen_tokens = args.gen_tokens
    if args.gen_timeout:
        cfg.gen_timeout_s = args.gen_timeout
    if args.skip_score:
        cfg.score = False
    if args.open_loop_rates is not None:
        cfg.open_loop_rates = tuple(float(x) for x in args.open_loop_rates.split(",") if x)
    if args.open_loop_s:
        cfg.open_loop_s = args.open_loop_s
    if args.goodput_probes is not None:
        cfg.goodput_probes = args.goodput_probes
    if args.beside_streams is not None:
        cfg.beside_streams = args.beside_streams
    if args.traffic_streams is not None:
        cfg.traffic_streams = args.traffic_streams
    if args.pairs:
        cfg.pairs = args.pairs
    if args.mc_questions:
        cfg.mc_questions = args.mc_questions
    cfg.engine = _engine_settings(args.engine)

    from ..engine import loader
    from ..engine.config import ModelConfig

    t = time.perf_counter()
    lm = loader.load(ModelConfig(model=model))
    print(f"baseline model loaded in {time.perf_counter() - t:.1f}s on {lm.device}", flush=True)
    w = make_workloads(lm.tokenizer, cfg)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    result = {"date": datetime.date.today().isoformat(), "device": device, "versions": versions(),
              "config": dataclasses.asdict(cfg), "model": model, "quantization": lm.quantization,
              "compute_dtype": str(lm.compute_dtype)}
    if not args.skip_baselines:
        b = {}
        t = time.perf_counter()
        b["raw_forward"] = baseline_raw_forward(lm, w, cfg.hflm_batch)
        b["hflm"] = baseline_hflm(lm, w, cfg.hflm_batch)
        b["generate"] = baseline_generate(lm, w, cfg)
        if cfg.traffic_streams:  # the same requests as the service's real-traffic rows (same seed)
            from ..api.pb import lm_pb2

            b["traffic"] = {name: baseline_traffic(lm, reqs)
                            for name, reqs in traffic_rows(lm_pb2, lm.tokenizer, w, cfg).items()}
        print(f"baselines done in {time.perf_counter() - t:.0f}s", flush=True)
        result["baselines"] = b
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "baselines.json").write_text(json.dumps(result, indent=2))  # kept if the service fails
    tokenizer = lm.tokenizer
    del lm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    t = time.perf_counter()
    result["service"] = run_service(model, w, cfg, tokenizer)
    print(f"service done in {time.perf_counter() - t:.0f}s", flush=True)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.frontend_ab:
        front = dataclasses.replace(cfg, frontend=True, score=False, open_loop_rates=())
        result["service_frontend"] = run_service(model, w, front, tokenizer)
        result["frontend_hop"] = frontend_hop(result["service_frontend"], result["service"])
        (out / "frontend-hop.json").write_text(json.dumps(result["frontend_hop"], indent=2))
        print(hop_table(result["frontend_hop"]), flush=True)
    stem = f"bench-{'quick' if cfg.quick else 'gpu'}"
    try:
        result["check"] = check_outputs(model, w, result["service"], cfg)
    except WrongOutput as e:
        result["check"] = {"problems": str(e)}
        (out / f"{stem}-WRONG.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
        raise SystemExit(f"BENCHMARK FAILED ITS OUTPUT CHECK, no table: {e}") from None
    print(f"output check: {result['check']['checked_streams']} streams hold transformers' tokens "
          f"(largest gap {result['check']['max_gap']:.3f} <= {result['check']['tie']})", flush=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    md = "\n\n".join(x for x in (table(result) if "baselines" in result else "", traffic_table(result["service"])) if x)
    if md:
        (out / f"{stem}.md").write_text(md + "\n")
        print(md)
    return result


if __name__ == "__main__":
    main()
