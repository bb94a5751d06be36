"""The deployment fault tests over NIXL: a client that goes away, a prefill worker killed or stalled mid-
transfer, a passed deadline. Each request ends within the same bound as over TCP, and every surviving
worker's free-block count returns to where it started. One difference is by design: a decode reservation
whose prefill worker vanished while it could still WRITE stays quarantined for the fence grace period
(receiver.py: 6 s past the connection's end), so those blocks come back that much later."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from splitserve.transfer.nixl_agent import module_name
from tests.greedy import assert_greedy_match, ref_greedy
from tests.runtime.deployment import Deployment, loaded_bound
from tests.runtime.test_faults import COMMON, PROMPT, QUIET_BOUND_S, assert_blocks_back, checkpoint, complete_ids, hf, stream_tokens  # noqa: F401

pytestmark = pytest.mark.skipif(module_name() is None, reason="NIXL not installed (make test installs it)")
NIXL = ["--transfer", "nixl", *COMMON]
FENCE_GRACE_S = 6.0  # KVReceiver's default
STALL_S = 2.0  # KVReceiver's default idle limit on a sender's control connection


def test_client_abort_frees_blocks_everywhere_over_nixl(checkpoint):
    with Deployment(checkpoint, "--prefill", "1", "--decode", "1", *NIXL) as dep:
        before = dep.free_blocks()
        for i, _ in enumerate(stream_tokens(dep.url, PROMPT, 900)):
            if i == 2:
                break  # the client goes away mid-stream
        closed = time.monotonic()
        assert_blocks_back(dep, before, list(before))
        assert time.monotonic() - closed < loaded_bound(QUIET_BOUND_S)


def test_killed_prefill_worker_mid_transfer_is_recomputed_over_nixl(checkpoint, hf):
    ref_tokens, ref_logits = ref_greedy(hf, PROMPT, 12)
    with Deployment(checkpoint, "--prefill", "1", "--decode", "1", *NIXL) as dep:
        assert complete_ids(dep.url, PROMPT[:20], 2).status_code == 200  # the NIXL connection exists
        before = dep.free_blocks()
        (p,) = dep.workers("prefill")
        (d,) = dep.workers("decode")
        os.kill(p["pid"], signal.SIGSTOP)  # frozen with the ticket claimed, before or between WRITEs...
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("r", complete_ids(dep.url, PROMPT, 12)))
        t.start()
        time.sleep(0.5)
        killed = time.monotonic()
        os.kill(p["pid"], signal.SIGKILL)  # ...when it dies
        t.join(timeout=30)
        assert time.monotonic() - killed < loaded_bound(QUIET_BOUND_S)
        r = result["r"]
        assert r.status_code == 200, r.text
        assert_greedy_match(r.json()["choices"][0]["token_ids"], ref_tokens, ref_logits)
        rec = dep.requests()[-1]
        assert rec["path"] == "recompute" and rec["events"], rec
        after = dep.wait_all_free(timeout=FENCE_GRACE_S + QUIET_BOUND_S)
        assert after[d["url"]][0] == before[d["url"]][0] == after[d["url"]][1]


def test_stalled_prefill_worker_times_out_and_recomputes_over_nixl(checkpoint, hf):
    ref_tokens, ref_logits = ref_greedy(hf, PROMPT, 8)
    args = ["--prefill", "1", "--decode", "1", "--transfer-deadline", "2", "--transfer-deadline-per-token", "0"]
    with Deployment(checkpoint, *args, *NIXL) as dep:
        assert complete_ids(dep.url, PROMPT[:20], 4).status_code == 200
        before = dep.free_blocks()
        (p,) = dep.workers("prefill")
        (d,) = dep.workers("decode")
        os.kill(p["pid"], signal.SIGSTOP)
        try:
            start = time.monotonic()
            r = complete_ids(dep.url, PROMPT, 8)
            assert time.monotonic() - start < loaded_bound(QUIET_BOUND_S)
            assert r.status_code == 200, r.text
            assert_greedy_match(r.json()["choices"][0]["token_ids"], ref_tokens, ref_logits)
            rec = dep.requests()[-1]
            assert rec["path"] == "recompute" and any("stalled" in e or "deadline" in e for e in rec["events"]), rec
            # The frozen sender holds a claim it may still WRITE: the blocks come back once its silent
            # connection is dropped (the idle limit) and the grace period has passed.
            after = dep.wait_all_free(timeout=STALL_S + FENCE_GRACE_S + QUIET_BOUND_S)
            assert after[d["url"]][0] == before[d["url"]][0] == after[d["url"]][1]
        finally:
            os.kill(p["pid"], signal.SIGCONT)
        end = time.monotonic() + loaded_bound(QUIET_BOUND_S)
        while (stats := dep.operator.get(p["url"] + "/internal/stats", timeout=5).json())["num_free_blocks"] != before[p["url"]][0]:
            assert time.monotonic() < end, stats
            time.sleep(0.1)


def test_passed_deadline_fails_with_a_clear_error_over_nixl(checkpoint):
    args = ["--prefill", "1", "--decode", "1", "--transfer-deadline", "0", "--transfer-deadline-per-token", "0",
            "--on-transfer-failure", "fail"]
    with Deployment(checkpoint, *args, *NIXL) as dep:
        before = dep.free_blocks()
        r = complete_ids(dep.url, PROMPT, 8)
        assert r.status_code == 500
        assert "deadline" in r.json()["error"]["message"]
        assert_blocks_back(dep, before, list(before))
