"""The model engine: loading, tokenization, scoring and generation; plain Python + PyTorch, no ray, no grpc."""
