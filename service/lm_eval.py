"""lm-evaluation-harness model `polyglot-grpc`: evaluates a running service over its gRPC API.

    python -m service.lm_eval run --model polyglot-grpc --model_args address=HOST:9000 --tasks kobest_copa

(`python -m service.lm_eval` is lm-eval's own command line with this model registered and the KoBEST tasks read
offline from the published files (service/kobest); in Python, `import service.lm_eval` registers the model for
`lm_eval.simple_evaluate(model="polyglot-grpc", ..., task_manager=service.kobest.task_manager())`.)
Requests go out concurrently; loglikelihood requests that share a context are sent as one Score
call, so the service computes that context once for all its choices. Each finished request goes to lm-eval's cache
hook at once, so a run with `--use_cache` that is interrupted keeps what it finished. generate_until follows HFLM:
contexts left-truncated to the window minus max_gen_toks, special tokens left out of the text.
"""
from __future__ import annotations

import collections
import concurrent.futures

import lm_eval.models  # noqa: F401 - lm-eval's own models (hf, ...): it imports them only into an empty registry
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from .client import Client


@register_model("polyglot-grpc")
class PolyglotGRPC(LM):
    def __init__(self, address: str = "localhost:9000", concurrency: int = 128, token: str | None = None,
                 timeout: float = 600.0, max_pairs: int = 64, max_length: int | None = None,
                 batch_size=None, max_batch_size=None, device=None):
        """model_args: address, concurrency (Score/Generate calls in flight; 128 ran KoBEST 5-shot 10 % faster than 32
        on an H200), token, timeout, max_pairs (pairs per Score call), max_length (the
        window generate_until truncates to; default the service's). lm-eval passes batch_size, max_batch_size and
        device to every model: batching and placement are the server's job, so they are accepted and unused. Any
        other key (a typo) is refused by Python with its name."""
        super().__init__()
        self.client = Client(address, token=token)
        self.concurrency = int(concurrency)
        self.timeout = float(timeout)
        self.max_pairs = int(max_pairs)
        self._max_length = int(max_length) if max_length else None

    @property
    def max_length(self) -> int:
        if self._max_length is None:
            self._max_length = self.client.model_info(timeout=self.timeout).max_context
        return self._max_length

    def _map(self, fn, items, desc: str, disable_tqdm: bool = False, weights=None):
        """fn over items on `concurrency` threads, in order; a progress bar counts lm-eval requests (`weights`: how
        many each item carries) as their calls return."""
        from tqdm import tqdm

        weights = weights or [1] * len(items)
        with concurrent.futures.ThreadPoolExecutor(self.concurrency) as ex, \
                tqdm(total=sum(weights), desc=desc, disable=disable_tqdm) as bar:
            futures = [ex.submit(fn, x) for x in items]
            index = {f: i for i, f in enumerate(futures)}
            for f in concurrent.futures.as_completed(futures):
                bar.update(weights[index[f]])
            return [f.result() for f in futures]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args) for r in requests]
        by_context: dict[str, list[int]] = collections.defaultdict(list)
        for i, (ctx, _) in enumerate(pairs):
            by_context[ctx].append(i)
        calls = [idx[k : k + self.max_pairs] for idx in by_context.values() for k in range(0, len(idx), self.max_pairs)]

        def score(idx):
            r = self.client.score([pairs[i] for i in idx], truncate=True, timeout=self.timeout)
            out = [(s.logprob, s.is_greedy) for s in r.scores]
            for i, x in zip(idx, out):
                self.cache_hook.add_partial("loglikelihood", pairs[i], x)
            return out

        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        for idx, res in zip(calls, self._map(score, calls, "Scoring through the service", disable_tqdm,
                                             [len(c) for c in calls])):
            for i, x in zip(idx, res):
                out[i] = x
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        def rolling(r):
            ll = self.client.score_rolling(r.args[0], timeout=self.timeout).logprob
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, ll)
            return ll

        return self._map(rolling, requests, "Rolling scores through the service", disable_tqdm)

    def _prompt(self, context: str, max_gen: int) -> str | list[int]:
        """HFLM keeps the last max_length - max_gen_toks tokens of a context. A token is at least one UTF-8 byte, so
        a context of fewer bytes than that needs no tokenizing."""
        keep = self.max_length - max_gen
        if len(context.encode("utf-8")) <= keep:
            return context
        ids = list(self.client.tokenize(context, timeout=self.timeout).ids)
        return ids[-keep:] if len(ids) > keep else context

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        def gen(r):
            context, kwargs = r.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            max_gen = int(kwargs.get("max_gen_toks", 256))
            params = dict(max_new_tokens=max_gen, stop=[until] if isinstance(until, str) else list(until),
                          skip_special_tokens=True)  # HFLM decodes with skip_special_tokens=True
            if kwargs.get("do_sample"):
                params["temperature"] = float(kwargs.get("temperature", 1.0))
            elif "temperature" in kwargs and float(kwargs["temperature"]) > 0:
                params["temperature"] = float(kwargs["temperature"])
            text = self.client.generate(self._prompt(context, max_gen), timeout=self.timeout, **params).text
            self.cache_hook.add_partial("generate_until", r.args, text)
            return text

        return self._map(gen, requests, "Generating through the service", disable_tqdm)


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line, with the offline KoBEST tasks (service/kobest) in place of its hub-reading kobest_*
    tasks, and one flag of ours: `--kobest_dir PATH`, the KoBEST v1.0 files (default ../shared/data/kobest)."""
    import os
    import sys

    from lm_eval.__main__ import cli_evaluate

    from .kobest import ENV, TASK_DIR

    args = list(sys.argv[1:] if argv is None else argv)
    if "--kobest_dir" in args:
        i = args.index("--kobest_dir")
        os.environ[ENV] = args[i + 1]
        del args[i : i + 2]
    if args[:1] == ["run"]:
        if "--include_path" in args:  # lm-eval's run takes one path, and this one is ours
            sys.exit(f"--include_path: this command passes {TASK_DIR} there (the offline KoBEST tasks); "
                     "use `lm_eval run` for other task directories")
        args += ["--include_path", str(TASK_DIR)]
    sys.argv = [sys.argv[0], *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
