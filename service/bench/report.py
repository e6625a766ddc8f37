"""The benchmark's Markdown tables: each service figure beside its baseline and the ratio, Score beside Generate,
the open-loop curve with goodput, and the Frontend hop."""
from __future__ import annotations

import platform
import torch

def versions() -> dict:
    import importlib.metadata as md

    v = {"python": platform.python_version(), "torch": torch.__version__}
    for p in ("transformers", "bitsandbytes", "ray", "grpcio", "lm_eval"):
        try:
            v[p] = md.version(p)
        except md.PackageNotFoundError:
            v[p] = None
    return v


def _ratio(a, b):
    return round(a / b, 2) if a and b else None


def table(r: dict) -> str:
    b, s = r["baselines"], r["service"]
    rows = [("Score, independent pairs (tokens/s)", s["score_pairs"]["tokens_per_s"], "HFLM batch 64",
             b["hflm"]["pairs"]["tokens_per_s"]),
            ("Score, independent pairs (tokens/s)", s["score_pairs"]["tokens_per_s"], "raw forward + log-softmax",
             b["raw_forward"]["tokens_per_s"]),
            ("Score, 4-way multiple choice (pair-tokens/s)", s["score_mc"]["tokens_per_s"], "HFLM batch 64",
             b["hflm"]["mc"]["tokens_per_s"])]
    for c, g in s["generate"].items():
        base = b["generate"].get(c)
        rows.append((f"Generate, {c} concurrent streams (tokens/s)", g["tokens_per_s"], f"`generate` batch {c}",
                     base["tokens_per_s"] if base else None))
    traffic = s.get("traffic", {})
    for name, g in traffic.items():
        base = b.get("traffic", {}).get(name)
        shapes = ("prompts 50–1,500, 16–512 new, half sampled" if name.startswith("mixed") else
                  "sampled, prompts 100–1,000, 256 new, logprobs + 5 alternatives" if name.startswith("logprobs") else
                  "prompts 100–1,000, 256 new")
        rows.append((f"Generate, {name} streams, {shapes} (tokens/s)", g["tokens_per_s"],
                     f"`generate`, same requests ({base['batches']} batch{'es' if base['batches'] > 1 else ''})"
                     if base else "–", base["tokens_per_s"] if base else None))
    lines = ["| workload | service | baseline | baseline value | ratio |", "|---|---:|---|---:|---:|"]
    for name, sv, bn, bv in rows:
        lines.append(f"| {name} | {sv:,.0f} | {bn} | {bv:,.0f} | {_ratio(sv, bv)} |" if bv else
                     f"| {name} | {sv:,.0f} | {bn} | – | – |")
    lines += ["", "| Generate streams | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | completed | errors |",
              "|---:|---:|---:|---:|---|"]
    ms = lambda x: f"{x * 1000:,.0f}" if x is not None else "–"  # noqa: E731
    for c, g in [*s["generate"].items(), *traffic.items()]:
        lines.append(f"| {c} | {ms(g['ttft_s']['p50'])} / {ms(g['ttft_s']['p99'])} | "
                     f"{ms(g['itl_s']['p50'])} / {ms(g['itl_s']['p99'])} | {g['completed']}/{g['streams']} | "
                     f"{g['errors'] or 0} |")
    sp, mc = s["score_pairs"], s["score_mc"]
    lines += ["", f"Score calls: independent {sp['completed']}/{sp['requests']} completed, errors {sp['errors'] or 0}, "
              f"latency p50/p99 {ms(sp['latency_s']['p50'])}/{ms(sp['latency_s']['p99'])} ms, "
              f"mean pairs per forward {sp['mean_batch_pairs']:.1f}; multiple choice {mc['completed']}/{mc['requests']}, "
              f"errors {mc['errors'] or 0}. Peak GPU memory {s.get('peak_gpu_memory_mib') or '–'} MiB. "
              f"Replica start {s['startup_s']:.0f} s.", "",
              f"Device: {r['device']}; {r['date']}; versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items())]
    return "\n".join(lines)


def traffic_table(s: dict) -> str:
    """Score beside Generate and the open-loop curve, with goodput (empty when neither ran)."""
    ms = lambda x: f"{x * 1000:,.0f}" if x is not None else "–"  # noqa: E731
    lines = []
    if "beside" in s:
        f, g = s["beside"]["score"], s["beside"]["streams"]
        lines += ["| Score flood + sampled streams at once | Score tokens/s (vs solo) | streams tokens/s | "
                  "stream TTFT p99 (ms) | inter-token p50 / p99 (ms) | completed | errors |",
                  "|---|---:|---:|---:|---:|---:|---|",
                  f"| {f['requests']} pairs + {g['streams']} streams | {f['tokens_per_s']:,.0f} "
                  f"({s['beside']['score_vs_solo']:.0%}) | {g['tokens_per_s']:,.0f} | {ms(g['ttft_s']['p99'])} | "
                  f"{ms(g['itl_s']['p50'])} / {ms(g['itl_s']['p99'])} | {f['completed']} + {g['completed']} | "
                  f"{({**f['errors'], **g['errors']}) or 0} |", ""]
    if "open_loop" in s:
        lines += ["| offered (requests/s) | completed/s | tokens/s | TTFT p50 / p99 (ms) | inter-token p50 / p99 (ms) "
                  "| completed | refused or failed | meets TTFT p99 ≤ 1 s, ITL p99 ≤ 100 ms |",
                  "|---:|---:|---:|---:|---:|---:|---|---|"]
        for rate, r in sorted(s["open_loop"].items(), key=lambda kv: float(kv[0])):  # probes ran after the grid
            lines.append(f"| {float(rate):g}{' (probe)' if r.get('probe') else ''} | {r['completed_per_s']:.1f} | {r['tokens_per_s']:,.0f} | "
                         f"{ms(r['ttft_s']['p50'])} / {ms(r['ttft_s']['p99'])} | {ms(r['itl_s']['p50'])} / "
                         f"{ms(r['itl_s']['p99'])} | {r['completed']}/{r['streams']} | {r['errors'] or 0} | "
                         f"{'yes' if r['meets_goal'] else 'no'} |")
        g = s.get("goodput_per_s")
        lines += ["", f"Goodput (sampled, prompts 200–800, 64–256 new): {g:g} requests/s" if g is not None else
                  "Goodput: no rate met the objective"]
    return "\n".join(lines)


def frontend_hop(front: dict, direct: dict) -> dict:
    """tokens/s of each Generate row through the Frontend and straight to the model replica, and their ratio."""
    rows = {f"{c} streams, benchmark path": (front["generate"][c], direct["generate"][c]) for c in direct["generate"]}
    rows.update({k: (front["traffic"][k], v) for k, v in direct.get("traffic", {}).items()})
    return {name: {"frontend": a["tokens_per_s"], "direct": b["tokens_per_s"],
                   "ratio": a["tokens_per_s"] / b["tokens_per_s"] if b["tokens_per_s"] else None}
            for name, (a, b) in rows.items()}


def hop_table(hop: dict) -> str:
    lines = ["| Generate row | through Frontend (tokens/s) | proxy → replica (tokens/s) | ratio |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {v['frontend']:,.0f} | {v['direct']:,.0f} | {v['ratio']:.3f} |" for k, v in hop.items()]
    return "\n".join(lines)
