"""GPU profiles beside the benchmark: the decode step, the prefill step, the decode attention kernel's launch settings,
the 4-bit matmul kernel, the real-traffic rows on the engine alone, Score in-process, and multi-GPU autoscaling."""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import json
import random
import subprocess
import threading
import time
from pathlib import Path

import torch

from ..engine.gemm4bit import graph_us
from .baselines import sync
from .driver import free_port, pct, percentiles
from .workloads import BenchConfig, make_workloads, traffic_requests

def gemm4bit_sweep(model: str, out: Path, rows=(1, 8, 16, 32, 64, 128), iters: int = 20) -> dict:
    """engine/gemm4bit.py's 4-bit matmul against the dense fp16 copies (F.linear, cuBLAS) and bitsandbytes' own
    layer, on layer 0's four linear layers of the model, at decode batch sizes: microseconds per call (CUDA graph),
    the packed weights' read rate, each result's error against the dense copy's, and per row count the whole step's
    projected matmul time (28 layers) for each path. Every launch setting is timed at 1 and 64 rows (there at
    tiles of 16, 32 and 64 rows); the other row counts time the 6 fastest of the nearer of those two (compiling
    every setting at every tile height for every row count would take minutes)."""
    import torch.nn.functional as F

    from ..engine import gemm4bit, loader
    from ..engine.config import ModelConfig
    from ..engine.neox import dequantized_weights

    lm = loader.load(ModelConfig(model=model))
    layer = lm.model.gpt_neox.layers[0]
    mods = {"query_key_value": layer.attention.query_key_value, "dense": layer.attention.dense,
            "dense_h_to_4h": layer.mlp.dense_h_to_4h, "dense_4h_to_h": layer.mlp.dense_4h_to_h}
    dense = dequantized_weights(lm.model, lm.compute_dtype)
    # Packed before any of bitsandbytes' own calls (on some CPUs its first call repacks the weights in place).
    packs = {name: gemm4bit.pack(m.weight.data, m.weight.quant_state) for name, m in mods.items()}
    n_layers = len(lm.model.gpt_neox.layers)
    # The scale applied per element lost every case of the 2026-12-04 sweeps to the scale applied after the dot.
    every = [gemm4bit.Launch(block_n=bn, split=sp, scale_after=True, prefetch=pf, stages=st, words=wr, reg_table=wr)
             for bn, sp, (pf, st), wr in itertools.product((32, 64, 128), (1, 2, 4), ((False, 3), (True, 3), (True, 1)),
                                                           (False, True))]
    res: dict = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"), "cases": [],
                 "step_ms": {}}
    g = torch.Generator(device="cpu").manual_seed(0)
    fastest: dict[tuple[str, int], list] = {}
    for M in sorted(rows, key=lambda m: (m not in (1, 64), m)):
        step = {"dense": 0.0, "bitsandbytes": 0.0, "gemm4bit_best": 0.0}
        for name, m in mods.items():
            w = packs[name]
            x = torch.randn(M, w.in_features, generator=g).to(lm.device, lm.compute_dtype)
            ref = F.linear(x, dense[m], m.bias)
            case = {"layer": name, "rows": M, "dense_us": graph_us(lambda: F.linear(x, dense[m], m.bias), iters),
                    "bitsandbytes_us": graph_us(lambda: m(x), iters), "runs": []}
            top = gemm4bit.block_m(M)
            if M in (1, 64):  # every setting at every tile height up to M's (several row tiles may beat one)
                tried = [dataclasses.replace(h, block_m=bm) for h in every for bm in (16, 32, 64) if bm <= top]
            else:
                tried = [dataclasses.replace(h, block_m=min(h.block_m, top)) for h in fastest[(name, 1 if M < 16 else 64)]]
            for how in tried:
                if w.in_features % (how.split * how.block_k):
                    continue
                try:
                    got = gemm4bit.matmul(x, w, m.bias, how)
                    us = graph_us(lambda: gemm4bit.matmul(x, w, m.bias, how), iters)
                except Exception as e:  # a setting Triton cannot compile (e.g. out of shared memory)
                    case["runs"].append({**dataclasses.asdict(how), "error": str(e)[:200]})
                    continue
                err = float((got.float() - ref.float()).norm() / ref.float().norm())
                case["runs"].append({**dataclasses.asdict(how), "us": us, "rel_err": err,
                                     "tb_per_s": (w.codes.numel() + w.absmax.numel() * 4) / us / 1e6})
            ok = sorted((r for r in case["runs"] if "us" in r), key=lambda r: r["us"])
            if M in (1, 64):
                fields = [f.name for f in dataclasses.fields(gemm4bit.Launch)]
                fastest[(name, M)] = [gemm4bit.Launch(**{k: r[k] for k in fields}) for r in ok[:6]]
            case["runs"] = ok[:6] + [r for r in case["runs"] if "error" in r][:3]
            res["cases"].append(case)
            if not ok:
                print(json.dumps(case)[:2000], flush=True)
                continue
            best = ok[0]
            step["dense"] += case["dense_us"] * n_layers / 1000
            step["bitsandbytes"] += case["bitsandbytes_us"] * n_layers / 1000
            step["gemm4bit_best"] += best["us"] * n_layers / 1000
            print(json.dumps({k: case[k] for k in ("layer", "rows", "dense_us", "bitsandbytes_us")} | {"best": best}),
                  flush=True)
        res["step_ms"][str(M)] = step
        print(M, step, flush=True)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gemm4bit-sweep.json").write_text(json.dumps(res, indent=2))
    return res


def gemm4bit_loop(how, K: int = 4096, capability: int = 90) -> dict:
    """engine/gemm4bit.py's kernel for one launch compiled for a GPU of this compute capability without one
    (Triton's own compiler, on any machine): PTX instructions of its K loop per weight each thread handles, its
    shared memory, local-memory (spill) references, and the count of each instruction in the loop. Instruction
    counts, not times: how launches' loops differ, read where no GPU is at hand."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ..engine import gemm4bit

    final = how.split == 1
    sig = {"x_ptr": "*fp16", "codes_ptr": "*i32" if how.words else "*u8", "absmax_ptr": "*fp32", "table_ptr": "*fp32",
           "bias_ptr": "*fp16", "out_ptr": "*fp16" if final else "*fp32", "M": "i32", "N": "i32", "K": "i32",
           "stride_xm": "i32", "stride_om": "i32", "stride_os": "i32"}
    consts = gemm4bit.constants(how, K, has_bias=True)
    sig.update({c: "constexpr" for c in consts})
    aligned = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 5, 7, 8, 9, 10)}  # pointers, sizes, strides
    k = triton.compile(ASTSource(fn=gemm4bit._gemm_4bit_kernel, signature=sig, constexprs=consts, attrs=aligned),
                       target=GPUTarget("cuda", capability, 32),
                       options={"num_warps": how.warps, "num_stages": how.stages})
    lines = k.asm["ptx"].splitlines()
    top = next(i for i, line in enumerate(lines) if "Inner Loop Header" in line)
    end = max(i for i, line in enumerate(lines) if i > top and re.search(r"bra\s+\$L__BB0_\d+;", line))
    body = [line.strip() for line in lines[top:end + 1]
            if line.strip() and not line.strip().startswith(("//", ".loc", "$"))]
    ops: dict[str, int] = {}
    for line in body:
        op = re.sub(r"^@!?%p\d+\s+", "", line).split()[0]
        ops[op] = ops.get(op, 0) + 1
    weights = how.block_n * how.block_k / (how.warps * 32)
    return {"launch": dataclasses.asdict(how), "instructions_per_weight": len(body) / weights,
            "shared_bytes": k.metadata.shared, "local_refs": len(re.findall(r"\.local", k.asm["ptx"])),
            "loop_ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])), "sass": _sass_loop(k.asm["cubin"], weights)}


_PIPES = {"shared memory and shuffles": ("LDS", "STS", "LDSM", "SHFL"), "tensor cores": ("HMMA", "HGMMA"),
          "global memory": ("LDG", "LDGSTS", "STG"), "barriers": ("BAR",)}


def _sass_loop(cubin: bytes, weights: float) -> dict | None:
    """The machine code (SASS) of a kernel's innermost loop, from its cubin by nvdisasm (shipped with Triton):
    instructions per weight each thread handles, in all and by the unit they issue to. PTX is not what runs:
    ptxas turns the table gathers and the tile's trip to the tensor cores into shared-memory stores, loads and
    shuffles, which one unit per multiprocessor carries. None where nvdisasm is absent."""
    import os
    import re
    import subprocess
    import tempfile

    import triton

    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    if not os.path.exists(nvdisasm):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout
    code = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    labels = {m.group(1): int(m.group(2), 16) for m in re.finditer(r"(\.L_x_\d+):\s*\n\s*/\*([0-9a-f]{4,})\*/", sass)}
    # The loop: from the target of the last backward branch to that branch.
    loops = [(labels[m.group(1)], at) for at, ins in code
             if (m := re.search(r"BRA\s+`?\(?(\.L_x_\d+)", ins)) and m.group(1) in labels and labels[m.group(1)] < at]
    if not loops:
        return None
    lo, hi = loops[-1]
    ops = [re.sub(r"^@!?U?P\w+\s+", "", ins).split()[0].split(".")[0] for at, ins in code if lo <= at <= hi]
    by_pipe = {pipe: sum(op in names for op in ops) / weights for pipe, names in _PIPES.items()}
    return {"instructions_per_weight": len(ops) / weights, "per_weight_by_unit": by_pipe,
            "ops": dict(collections.Counter(ops).most_common(12))}


def gemm4bit_ptx(out: Path) -> list[dict]:
    """gemm4bit_loop for every launch gemm4bit.tune tries, at tiles of 16 and 64 rows (CPU: no GPU needed)."""
    from ..engine import gemm4bit

    res = [gemm4bit_loop(dataclasses.replace(h, block_m=bm)) for bm in (16, 64) for h in gemm4bit.CANDIDATES]
    for r in res:
        print(json.dumps({k: r[k] for k in ("launch", "instructions_per_weight", "shared_bytes", "local_refs")}))
    out.mkdir(parents=True, exist_ok=True)
    (out / "gemm4bit-ptx.json").write_text(json.dumps(res, indent=2))
    return res


def profile_decode(model: str, out: Path, batches=(1, 8, 64), prompt_len: int = 32, steps: int = 50) -> dict:
    """Where a decode step's time goes, without the serving layer: step time eager, in a CUDA graph, and in
    graphs launched back to back as the pipelined scheduler does (decode_again), with the torch glue, with
    the fused Triton kernels (engine/fused.py), and with those plus dequantized weights for batches above one
    (GenerationConfig.dequantized_decode), at several batch sizes; and the top kernels of eager steps
    (torch.profiler: batch 1, and batch 64 with the dequantized weights)."""
    from torch.profiler import ProfilerActivity, profile

    from ..engine import loader
    from ..engine.config import ModelConfig
    from ..engine.neox import NeoxRunner, dequantized_weights

    lm = loader.load(ModelConfig(model=model))
    res: dict = {"device": torch.cuda.get_device_name(0), "steps": {}}
    tables = []
    for fused, dense in ((False, False), (True, False), (True, True)):
        window = min(lm.max_context, 1024)
        name = ("fused" if fused else "torch") + (" dequantized" if dense else "")
        runner = NeoxRunner(lm.model, max(batches), window, use_graphs=True, fused_decode=fused,
                            dense=dequantized_weights(lm.model, lm.compute_dtype) if dense else None)
        assert runner.fused == fused, "fused kernels failed their start-up check (see the log)"
        runner.warm_up(max(batches), prompt_len + steps + 1)
        for b in batches:
            bases = [i * window for i in range(b)]
            runner.prefill_new(bases, [[5 + i % 100] * prompt_len for i in range(b)])
            row = {}
            for mode in ("eager", "graph", "pipelined"):
                runner.use_graphs = mode != "eager"
                tokens, pos = [7] * b, [prompt_len] * b
                runner.decode(tokens, pos, bases)  # warm-up / capture
                sync()
                t = time.perf_counter()
                for i in range(steps):
                    if mode == "pipelined":
                        runner.decode_again(b, prompt_len + 1 + i)
                    else:
                        runner.decode(tokens, pos, bases)
                sync()
                row[f"{mode}_ms"] = (time.perf_counter() - t) / steps * 1000
            res["steps"][f"{name} b={b}"] = row
            print(name, b, row, flush=True)
        runner.use_graphs = False
        b = max(batches) if dense else 1
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                runner.decode([7] * b, [prompt_len] * b, [i * window for i in range(b)])
            sync()
        tables.append(f"{name}: 5 eager batch-{b} steps\n"
                      + prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
        del runner
        torch.cuda.empty_cache()
    table = "\n\n".join(tables)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode-profile.txt").write_text(table)
    (out / "decode-profile.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    print(table)
    return res


def profile_prefill(model: str, out: Path, budgets=(1024, 2048, 4096), steps: int = 5) -> dict:
    """Where a prefill step's time goes, without the serving layer: packed prefill of new prompts of 100-1,000
    tokens (the real-traffic lengths) filling a step's token budget (GenerationConfig.prefill_chunk), on the
    dequantized weights as the engine runs it: milliseconds, prompt tokens per second and the TFLOP/s of the
    blocks' matmuls, per budget; and the top kernels and the host's time of the shipped budget's step
    (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    from ..engine import loader
    from ..engine.config import GenerationConfig, ModelConfig
    from ..engine.neox import NeoxRunner, dequantized_weights

    lm = loader.load(ModelConfig(model=model))
    window = lm.max_context
    rows = 64
    runner = NeoxRunner(lm.model, rows, window, use_graphs=False, fused_decode=True,
                        dense=dequantized_weights(lm.model, lm.compute_dtype))
    # Multiply-adds per token of the four linear layers of every block (their weights' elements).
    flop_per_token = 2 * sum(w.numel() for w in runner.dense.values())
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    res: dict = {"device": device, "flop_per_token": flop_per_token, "budgets": {}}

    def chunks(budget: int, seed: int):
        rng, out, left = random.Random(seed), [], budget
        while left > 0:
            n = min(left, rng.randint(100, 1000))
            out.append((len(out) * window, [rng.randrange(5, lm.tokenizer_size) for _ in range(n)], 0))
            left -= n
        return out[:rows]

    for budget in budgets:
        work = [chunks(budget, seed) for seed in range(steps + 1)]
        runner.prefill(work[0])  # allocator, kernels' first launch
        sync()
        t = time.perf_counter()
        for c in work[1:]:
            runner.prefill(c)
        sync()
        ms = (time.perf_counter() - t) / steps * 1000
        res["budgets"][str(budget)] = {"ms": ms, "prompts_per_step": sum(map(len, work[1:])) / steps,
                                       "tokens_per_s": budget / ms * 1000,
                                       "matmul_tflop_per_s": flop_per_token * budget / ms / 1e9}
        print(budget, res["budgets"][str(budget)], flush=True)
    budget = GenerationConfig.prefill_chunk
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for seed in range(3):
            runner.prefill(chunks(budget, 100 + seed))
        sync()
    table = (f"3 prefill steps of {budget} prompt tokens (prompts of 100-1,000)\n"
             + prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefill-profile.txt").write_text(table)
    (out / "prefill-profile.json").write_text(json.dumps(res, indent=2))
    print(table)
    return res


def attention_sweep(out: Path, heads: int = 16, head_dim: int = 256, iters: int = 30,
                    kv_dtypes: tuple[str, ...] = ("float16", "int8")) -> dict:
    """The fused decode attention alone (engine/fused.py) at serving shapes: rows x key counts drawn per row
    (1 to 128 rows; the real-traffic 100-1,256 keys in the 2,048-position bucket, 100-1,000 in the 1,024 one), for
    split counts, key blocks and warp counts: microseconds per layer and the bandwidth its key and
    value reads reach (what the kernel is bound by). Each case also times the launch settings the engine picks.
    Every case runs over a float16 cache and an int8 one (generation.kv_cache_dtype; its scales read counted), or
    those of kv_dtypes."""
    from ..engine import fused
    from ..engine.kvcache import quantize

    dev = torch.device("cuda")
    window = 2048
    cases = [(1, 100, 1256, 2048), (8, 100, 1256, 2048), (64, 100, 1256, 2048), (64, 100, 1000, 1024),
             (128, 100, 1256, 2048), (64, 20, 160, 256)]
    res: dict = {"device": torch.cuda.get_device_name(0), "cases": []}
    kc, vc = (torch.randn(heads, 128 * window, head_dim, dtype=torch.float16, device=dev) for _ in range(2))
    (k8, ks), (v8, vs) = quantize(kc), quantize(vc)
    caches = {kv: c for kv, c in (("float16", (kc, vc, None, None)), ("int8", (k8, v8, ks, vs))) if kv in kv_dtypes}

    def timed(*args, **kw) -> float:
        return graph_us(lambda: fused.decode_attention(*args, **kw), iters)

    for kv, (kc, vc, ks, vs) in caches.items():
        for rows, lo, hi, tmax in cases:
            rng = random.Random(rows)
            lens = [rng.randint(lo, hi) for _ in range(rows)]
            q = torch.randn(rows, heads, 1, head_dim, dtype=torch.float16, device=dev)
            start = torch.tensor([i * window for i in range(rows)], device=dev)
            pos = torch.tensor([n - 1 for n in lens], device=dev)
            # Bytes of keys and values (and their scales) read.
            read = sum(lens) * heads * 2 * (head_dim * kc.element_size() + (4 if ks is not None else 0))
            scales = {"kscale": ks, "vscale": vs}
            case = {"kv": kv, "rows": rows, "keys": [lo, hi], "tmax": tmax, "runs": []}
            # CUDA cores: the settings swept before; tensor cores: fewer (each is its own compile).
            # Stages (Triton's software pipelining depth, None = its default): fewer buffers, more programs per SM.
            grid = [*itertools.product([False], (1, 2, 4, 8, 16), (64, 128), (2, 4), [None]),
                    *itertools.product([True], (1, 2, 4, 8), (32, 64), (4, 8), (None, 2))]
            for dot, splits, block_t, warps, stages in grid:
                us = timed(q, kc, vc, start, pos, tmax, splits=splits, block_t=block_t, num_warps=warps, dot=dot,
                           num_stages=stages, **scales)
                case["runs"].append({"dot": dot, "splits": splits, "block_t": block_t, "warps": warps,
                                     "stages": stages, "us": us, "tb_per_s": read / us / 1e6})
            us = timed(q, kc, vc, start, pos, tmax, **scales)
            splits, block_t, warps, dot = fused.attention_launch(rows * heads, tmax, dev, int8=ks is not None)
            case["engine_default"] = {"dot": dot, "splits": splits, "block_t": block_t, "warps": warps, "us": us,
                                      "tb_per_s": read / us / 1e6}
            case["best_cuda_cores"] = min((r for r in case["runs"] if not r["dot"]), key=lambda r: r["us"])
            case["best"] = min(case["runs"], key=lambda r: r["us"])
            # The fastest dozen only: the whole grid of 12 cases is more than the GPU machine sends back in a file.
            case["runs"] = sorted(case["runs"], key=lambda r: r["us"])[:12]
            res["cases"].append(case)
            print(json.dumps({k: case[k] for k in ("kv", "rows", "keys", "tmax", "best", "best_cuda_cores",
                                                   "engine_default")}), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention-sweep.json").write_text(json.dumps(res, indent=2))
    return res


def engine_traffic(model: str, out: Path, cfg: BenchConfig | None = None) -> dict:
    """The real-traffic rows (sampled and greedy streams, prompts of 100-1,000 tokens, 256 new, all at once) run
    in-process on the Engine with the shipped engine config, no Ray or gRPC: set beside the service's rows, the
    difference is the serving layer's. Records every engine step's wall time by kind (pipelined: launched on the
    device's own tokens; full: with prefill or host-chosen tokens), and a cProfile of the model thread during a
    second sampled run (where the host's time per step goes)."""
    import cProfile
    import io
    import pstats

    from ..api.pb import lm_pb2
    from ..api.validation import generation_params
    from ..engine.config import EngineConfig
    from ..engine.engine import Engine
    from ..serve.app import split_args
    from ..serve.launch import load_config, override

    cfg = cfg or BenchConfig(model=model)
    args, _, _ = split_args(override(load_config(), model=model, engine=cfg.engine)["applications"][0]["args"])
    engine = Engine(EngineConfig.from_dict(args))
    sched = engine.scheduler
    steps: list[tuple[str, float]] = []  # (kind, seconds)
    step = sched.step

    def timed_step():
        kind = "pipelined" if sched._pending is not None else "full"
        t = time.perf_counter()
        try:
            return step()
        finally:
            steps.append((kind, time.perf_counter() - t))

    sched.step = timed_step
    profiler = None
    gen_step = engine._generation_step

    def profiled_step():
        if profiler is None:
            return gen_step()
        profiler.enable()
        try:
            return gen_step()
        finally:
            profiler.disable()

    engine._generation_step = profiled_step

    async def run(reqs) -> dict:
        ttft, itl, tokens = [], [], 0

        async def one(r):
            nonlocal tokens
            t = last = time.perf_counter()
            first = True
            async for chunk, _ in engine.generate(list(r.token_ids), generation_params(r.parameters, engine.cfg.limits)):
                now = time.perf_counter()
                k = len(chunk.token_ids)
                if first:
                    ttft.append(now - t)
                    first = False
                elif k:
                    itl.extend([(now - last) / k] * k)
                last, tokens = now, tokens + k

        t0 = time.perf_counter()
        await asyncio.gather(*(one(r) for r in reqs))
        dt = time.perf_counter() - t0
        return {"streams": len(reqs), "seconds": dt, "tokens": tokens, "tokens_per_s": tokens / dt,
                "ttft_s": percentiles(ttft), "itl_s": percentiles(itl)}

    def by_kind() -> dict:
        res = {}
        for kind in ("pipelined", "full"):
            xs = [d for k, d in steps if k == kind]
            if xs:
                res[kind] = {"steps": len(xs), "mean_ms": 1000 * sum(xs) / len(xs), "p50_ms": 1000 * pct(xs, 0.5),
                             "p99_ms": 1000 * pct(xs, 0.99), "total_s": sum(xs)}
        return res

    n = cfg.traffic_streams or 64
    res: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "rows": {}}
    tok = engine.lm.tokenizer
    try:
        asyncio.run(run(traffic_requests(lm_pb2, tok, None, 4, True, cfg, seed=9)))  # warm-up
        for kind in ("sampled", "greedy"):
            steps.clear()
            row = asyncio.run(run(traffic_requests(lm_pb2, tok, None, n, kind == "sampled", cfg)))
            row["engine_steps"] = by_kind()
            res["rows"][f"{kind} {n}"] = row
            print(f"engine {kind} {n}:", json.dumps(row), flush=True)
        profiler = cProfile.Profile()
        asyncio.run(run(traffic_requests(lm_pb2, tok, None, n, True, cfg)))
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
    finally:
        engine.close()
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine-traffic.json").write_text(json.dumps(res, indent=2))
    (out / "engine-traffic-profile.txt").write_text(text.getvalue())
    print(text.getvalue()[:6000])
    return res


def profile_score(model: str, out: Path, cfg: BenchConfig | None = None) -> dict:
    """Score without the serving layer: the engine's own throughput on the bench's pairs and multiple-choice
    questions (all submitted at once, as the batcher would see them), the top kernels of one batch of each
    kind, and the nf4 batch-invariance figure (each pair alone vs in a full batch)."""
    import asyncio

    from torch.profiler import ProfilerActivity, profile

    from ..engine.config import EngineConfig, ModelConfig
    from ..engine.engine import Engine, ScoreOptions
    from ..engine.scoring import group_choices, layout
    from ..engine.text import encode_pair

    cfg = cfg or BenchConfig()
    engine = Engine(EngineConfig(model=ModelConfig(model=model)))
    w = make_workloads(engine.lm.tokenizer, cfg)
    loop = asyncio.new_event_loop()
    opts = ScoreOptions()
    res: dict = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}

    def timed(calls: list[list[tuple[str, str]]], tokens: int) -> tuple[dict, list]:
        async def all_at_once():
            return await asyncio.gather(*(engine.score(c, opts) for c in calls))

        loop.run_until_complete(all_at_once())  # warm-up
        sync()
        t = time.perf_counter()
        results = loop.run_until_complete(all_at_once())
        sync()
        dt = time.perf_counter() - t
        return {"tokens": tokens, "seconds": dt, "tokens_per_s": tokens / dt}, results

    res["pairs"], together = timed([[p] for p in w.pairs], sum(w.pair_tokens))
    res["mc"], _ = timed([[(c, x) for x in xs] for c, xs in w.mc], sum(w.mc_tokens))

    # Batch invariance: the first 64 pairs one call at a time (batches of 1) vs inside the full run above.
    alone = [loop.run_until_complete(engine.score([p], opts))[0].logprob for p in w.pairs[:64]]
    diffs = [abs(a - r[0].logprob) for a, r in zip(alone, together[:64])]
    res["batch_invariance"] = {"pairs": 64, "max_abs_diff": max(diffs), "mean_abs_diff": sum(diffs) / len(diffs),
                               "max_rel_diff": max(d / max(abs(r[0].logprob), 1e-9) for d, r in zip(diffs, together))}

    print(json.dumps(res, indent=2), flush=True)
    tok, eot, window = engine.lm.tokenizer, engine.lm.eos_token_id, engine.window
    items = sorted((layout(encode_pair(tok, c, x, eot), window, False) for c, x in w.pairs), key=lambda it: it.length)
    budget = engine._max_batch_tokens  # one batch as the batcher would form it: mid-length pairs up to the budget
    mid = len(items) // 2
    longest = items[min(mid + 32, len(items) - 1)].length
    items = items[mid : mid + max(1, budget // longest)][:64]
    groups = [group_choices([encode_pair(tok, c, x, eot) for x in xs], window) for c, xs in w.mc[:8]]
    tables = {}
    for name, fn in (("pairs", lambda: engine.scorer.forward(items)),
                     ("mc", lambda: engine.scorer.forward_groups(groups))):
        fn()
        sync()
        t = time.perf_counter()
        fn()
        sync()
        res[f"{name}_one_batch_ms"] = (time.perf_counter() - t) * 1000
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            sync()
        tables[name] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=20)
    out.mkdir(parents=True, exist_ok=True)
    (out / "score-profile.txt").write_text("\n\n".join(f"== {k} ==\n{v}" for k, v in tables.items()))
    (out / "score-profile.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    for k, v in tables.items():
        print(f"== {k} ==\n{v}")
    engine.close()
    return res


def autoscale_run(model: str, out: Path, streams: int = 96, load_s: float = 90, max_replicas: int = 2) -> dict:
    """Multi-GPU autoscaling: the Serve config's policy with short delays, one GPU per replica; `streams` looping
    Generate clients for `load_s`, then quiet. Records replicas and per-GPU memory over time."""
    import grpc
    import ray
    from ray import serve

    from ..api.pb import lm_pb2, lm_pb2_grpc
    from ..serve.launch import deploy, load_config, override, start_ray

    start_ray(None, free_port(), object_store_mb=1024)
    port = free_port()
    cfg = override(load_config(), model=model, num_gpus=1, grpc_port=port, http_port=free_port())
    dep = cfg["applications"][0]["deployments"][0]
    dep["autoscaling_config"].update(min_replicas=1, initial_replicas=1, max_replicas=max_replicas,
                                     target_ongoing_requests=16, upscale_delay_s=5, downscale_delay_s=20)
    t0 = time.perf_counter()
    deploy(cfg, timeout_s=600)
    timeline, stop, done = [], threading.Event(), {"ok": 0, "errors": 0}

    def sample():
        while not stop.is_set():
            st = serve.status().applications["polyglot"].deployments["LanguageModel"]
            mem = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout.split("\n")
            timeline.append({"t": round(time.perf_counter() - t0, 1), "replicas": dict(st.replica_states),
                             "gpu_mem_mib": [int(x.split(",")[1]) for x in mem if x.strip()]})
            stop.wait(2)

    async def client_loop(deadline):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = lm_pb2_grpc.LanguageModelStub(ch)
            params = lm_pb2.GenerationParameters(max_new_tokens=128, min_new_tokens=128, ignore_eos=True)

            async def one():
                while time.perf_counter() < deadline:
                    try:
                        async for _ in stub.GenerateStream(lm_pb2.GenerateRequest(text="서울의 봄은", parameters=params),
                                                           timeout=120):
                            pass
                        done["ok"] += 1
                    except grpc.aio.AioRpcError:
                        done["errors"] += 1

            await asyncio.gather(*(one() for _ in range(streams)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        asyncio.run(client_loop(time.perf_counter() + load_s))
        quiet_end = time.perf_counter() + 90
        while time.perf_counter() < quiet_end:
            st = serve.status().applications["polyglot"].deployments["LanguageModel"].replica_states
            if st.get("RUNNING", 0) == 1 and len(timeline) > 3:
                break
            time.sleep(2)
        time.sleep(4)
    finally:
        stop.set()
        sampler.join(timeout=10)
        serve.shutdown()
        ray.shutdown()
    res = {"device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "streams": streams,
           "load_s": load_s, "requests": done, "max_replicas_seen": max(e["replicas"].get("RUNNING", 0) for e in timeline),
           "final_replicas": timeline[-1]["replicas"] if timeline else None, "timeline": timeline}
    out.mkdir(parents=True, exist_ok=True)
    (out / "autoscale.json").write_text(json.dumps(res, indent=2))
    print(json.dumps({k: v for k, v in res.items() if k != "timeline"}, indent=2))
    for e in timeline[:: max(1, len(timeline) // 25)]:
        print(e)
    return res
