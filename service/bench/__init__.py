"""The benchmark package (`python -m service.bench`, see __main__): workloads, baselines, the gRPC driver, the
output check, the report, and the GPU profiles beside it."""
from .check import WrongOutput, check_outputs
from .workloads import BenchConfig, gpu_model, make_workloads, random_korean

__all__ = ["BenchConfig", "WrongOutput", "check_outputs", "gpu_model", "make_workloads", "random_korean"]
