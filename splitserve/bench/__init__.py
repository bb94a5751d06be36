"""splitserve bench: trace-driven and synthetic load, latency percentiles, SLO attainment and goodput.

Python API:
    from splitserve.bench import BenchConfig, TraceLoad, SweepConfig, SLO, run_bench
    result = run_bench(BenchConfig(load=TraceLoad("trace.jsonl"), url="http://127.0.0.1:8000", slo=SLO(1.0, 0.05)))
"""

from splitserve.bench.config import BenchConfig, SweepConfig, TraceLoad
from splitserve.bench.results import BenchResult
from splitserve.bench.runner import run_bench
from splitserve.workload.slo import SLO

__all__ = ["SLO", "BenchConfig", "BenchResult", "SweepConfig", "TraceLoad", "run_bench"]
