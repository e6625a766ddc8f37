"""The API layer: protobuf <-> engine conversion, request validation, and gRPC status mapping."""
