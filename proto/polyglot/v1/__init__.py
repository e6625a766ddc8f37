"""polyglot.v1: lm_pb2 and lm_pb2_grpc are generated from lm.proto by `make proto`."""
