"""The `polyglot` command line: generate, score, tokenize and inspect a running service over gRPC."""
from __future__ import annotations

import argparse
import json
import sys

import grpc
from google.protobuf.json_format import MessageToDict

from .api.pb import lm_pb2
from .client import Client


def _print(msg) -> None:
    print(json.dumps(MessageToDict(msg, preserving_proto_field_name=True), ensure_ascii=False, indent=2))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="polyglot", description=__doc__)
    ap.add_argument("--address", default="localhost:9000")
    ap.add_argument("--token", help="bearer token, if the service requires one")
    ap.add_argument("--timeout", type=float, default=120)
    sub = ap.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate a continuation (streamed to stdout)")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", default=[])

    s = sub.add_parser("score", help="log-likelihood of a continuation given a context")
    s.add_argument("--context", default="")
    s.add_argument("--continuation", required=True)
    s.add_argument("--details", action="store_true", help="per-token log-probabilities")
    s.add_argument("--truncate", action="store_true")

    t = sub.add_parser("tokenize", help="token ids of a text")
    t.add_argument("text")
    sub.add_parser("info", help="model information")
    sub.add_parser("health", help="grpc.health.v1 check")

    a = ap.parse_args(argv)
    try:
        with Client(a.address, token=a.token) as c:
            if a.cmd == "generate":
                params = dict(
                    max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                    repetition_penalty=a.repetition_penalty, stop=a.stop,
                )
                if a.seed is not None:
                    params["seed"] = a.seed
                last = None
                for last in c.generate_stream(a.prompt, timeout=a.timeout, **params):
                    sys.stdout.write(last.text)
                    sys.stdout.flush()
                print()
                if last is not None:
                    print(f"[{last.generated_tokens} tokens, finish {lm_pb2.FinishReason.Name(last.finish_reason)}]", file=sys.stderr)
            elif a.cmd == "score":
                _print(c.score([(a.context, a.continuation)], truncate=a.truncate, token_details=a.details,
                               timeout=a.timeout))
            elif a.cmd == "tokenize":
                _print(c.tokenize(a.text, timeout=a.timeout))
            elif a.cmd == "info":
                _print(c.model_info(timeout=a.timeout))
            elif a.cmd == "health":
                print("SERVING" if c.healthy() else "NOT_SERVING")
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
