"""The generated protobuf modules, imported in one place with a clear message when they are missing."""
try:
    from polyglot.v1 import lm_pb2, lm_pb2_grpc  # noqa: F401
except ImportError as e:  # pragma: no cover - a set-up error, not a runtime path
    raise ImportError("polyglot.v1 stubs are missing: run `make proto` (or `make serve`/`make test`)") from e
