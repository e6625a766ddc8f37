"""lm-evaluation-harness model `polyglot-grpc`: evaluates a running service over its gRPC API.

    python -m service.lm_eval run --model polyglot-grpc --model_args address=HOST:9000 --tasks kobest_copa

(`python -m service.lm_eval` is lm-eval's own command line with this model registered; in Python,
`import service.lm_eval` registers it for `lm_eval.simple_evaluate(model="polyglot-grpc", ...)`.)
Requests go out concurrently; loglikelihood requests that share a context are sent as one Score
call, so the service computes that context once for all its choices.
"""
from __future__ import annotations

import collections
import concurrent.futures

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from .client import Client


@register_model("polyglot-grpc")
class PolyglotGRPC(LM):
    def __init__(self, address: str = "localhost:9000", concurrency: int = 32, token: str | None = None,
                 timeout: float = 600.0, max_pairs: int = 64, **_ignored):
        # lm-eval passes batch_size / device / max_batch_size to every model: batching is the server's job.
        super().__init__()
        self.client = Client(address, token=token)
        self.concurrency = int(concurrency)
        self.timeout = float(timeout)
        self.max_pairs = int(max_pairs)

    def _map(self, fn, items):
        with concurrent.futures.ThreadPoolExecutor(self.concurrency) as ex:
            return list(ex.map(fn, items))

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args) for r in requests]
        by_context: dict[str, list[int]] = collections.defaultdict(list)
        for i, (ctx, _) in enumerate(pairs):
            by_context[ctx].append(i)
        calls = [idx[k : k + self.max_pairs] for idx in by_context.values() for k in range(0, len(idx), self.max_pairs)]

        def score(idx):
            r = self.client.score([pairs[i] for i in idx], truncate=True, timeout=self.timeout)
            return [(s.logprob, s.is_greedy) for s in r.scores]

        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        for idx, res in zip(calls, self._map(score, calls)):
            for i, x in zip(idx, res):
                out[i] = x
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return self._map(lambda r: self.client.score_rolling(r.args[0], timeout=self.timeout).logprob, requests)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        def gen(r):
            context, kwargs = r.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            params = dict(max_new_tokens=int(kwargs.get("max_gen_toks", 256)), stop=[until] if isinstance(until, str) else list(until))
            if kwargs.get("do_sample"):
                params["temperature"] = float(kwargs.get("temperature", 1.0))
            elif "temperature" in kwargs and float(kwargs["temperature"]) > 0:
                params["temperature"] = float(kwargs["temperature"])
            return self.client.generate(context, timeout=self.timeout, **params).text

        return self._map(gen, requests)


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
