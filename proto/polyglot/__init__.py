"""Generated protobuf and gRPC modules of the polyglot API (built by `make proto`)."""
