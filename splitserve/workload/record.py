"""What the load generator writes down about one request: raw observations only, no derived metrics.

Times are seconds on the client's monotonic clock, counted from the start of the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# Why a request failed. "http": the server answered with a non-200 status; "stream": the body broke off,
# carried an error event or no token; "unsent": the run's deadline came before its send time; "stopped": a
# sweep ended the run once its SLO verdict was certain (a fail), before this request finished.
ErrorKind = Literal["http", "connect", "timeout", "stream", "deadline", "unsent", "stopped"]


@dataclass
class RequestRecord:
    index: int  # position in the workload
    scheduled_s: float  # when the schedule said to send it (closed loop: when a slot freed)
    input_len: int  # prompt tokens sent
    output_len: int  # max_tokens asked for
    sent_s: float | None = None
    first_token_s: float | None = None
    # Arrival time of every streamed chunk that carried output (one token per chunk on most servers).
    token_times_s: list[float] = field(default_factory=list)
    end_s: float | None = None
    prompt_tokens: int | None = None  # as the server's usage reports them
    completion_tokens: int = 0  # usage when reported, else the number of output chunks
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, when reported
    status: int = 0  # HTTP status; 0 when no response came
    retries: int = 0  # 429/503 refusals retried after their Retry-After (latencies count from the first send)
    error_kind: ErrorKind | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_kind is None and self.status == 200

    @property
    def error_label(self) -> str | None:
        """The bucket a failure is counted in: the HTTP status when there was one, else what went wrong."""
        if self.ok:
            return None
        return f"HTTP {self.status}" if self.error_kind == "http" else str(self.error_kind)
