"""splitserve bench: trace-driven and synthetic load, latency percentiles, SLO attainment and goodput.

Python API:
    from splitserve.bench import BenchConfig, TraceLoad, SweepConfig, SLO, run_bench
    result = run_bench(BenchConfig(load=TraceLoad("trace.jsonl"), url="http://127.0.0.1:8000", slo=SLO(1.0, 0.05)))
"""

from splitserve.workload.slo import SLO
from splitserve.bench.runner import BenchConfig, BenchResult, SweepConfig, TraceLoad, run_bench

__all__ = ["SLO", "BenchConfig", "BenchResult", "SweepConfig", "TraceLoad", "run_bench"]
