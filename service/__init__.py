"""polyglot-ko serving: a gRPC language-model service (Generate, Score) on Ray Serve."""
