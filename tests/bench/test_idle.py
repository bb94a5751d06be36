"""bench/idle.py: a run starts once the target has nothing in flight, read from its Prometheus /metrics."""

from __future__ import annotations

from splitserve.bench.idle import QUIET_READINGS, in_flight_from_metrics, wait_idle

SPLITSERVE = """# HELP splitserve_num_requests_running Requests in the running batch
# TYPE splitserve_num_requests_running gauge
splitserve_num_requests_running 2.0
# TYPE splitserve_num_requests_waiting gauge
splitserve_num_requests_waiting 3.0
# TYPE splitserve_kv_cache_usage_ratio gauge
splitserve_kv_cache_usage_ratio 0.5
"""
VLLM = """# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 1.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 0.0
"""


def test_running_and_waiting_requests_are_counted_from_either_servers_gauges():
    assert in_flight_from_metrics(SPLITSERVE) == 5
    assert in_flight_from_metrics(VLLM) == 1
    assert in_flight_from_metrics("# TYPE other gauge\nother 4\n") is None  # nothing to go by


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def test_it_waits_for_readings_of_nothing_in_flight_in_a_row():
    clock = Clock()
    readings = iter([3, 0, 1, 0, 0, 5])  # a lone 0 may be a stale reading: not yet
    assert wait_idle(lambda: next(readings), 60.0, 1.0, clock, clock.sleep) is True
    assert clock.now == 4.0 and QUIET_READINGS == 2


def test_a_server_that_stays_busy_is_given_up_on_and_one_that_cannot_tell_is_not_waited_for():
    clock = Clock()
    assert wait_idle(lambda: 1, 10.0, 1.0, clock, clock.sleep) is False
    assert clock.now == 10.0
    clock.now = 0.0
    assert wait_idle(lambda: None, 10.0, 1.0, clock, clock.sleep) is None and clock.now == 0.0
