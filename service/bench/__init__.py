"""The benchmark package (`python -m service.bench`, see __main__): workloads, baselines, the gRPC driver, the
output check, the report, the GPU profiles beside it, and the KV-cache admission replay (kvsim)."""
from .check import WrongOutput, check_outputs
from .workloads import BenchConfig, gpu_model, make_workloads, random_korean

__all__ = ["BenchConfig", "WrongOutput", "check_outputs", "gpu_model", "make_workloads", "random_korean"]
