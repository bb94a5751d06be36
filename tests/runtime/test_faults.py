"""Faults in a disaggregated deployment, over each KV transport (TCP and NIXL): a client that goes away, a
prefill or decode worker killed with SIGKILL, a stalled prefill worker, a passed transfer deadline. Each
ends its request within 5 s (with the right outcome), and every surviving worker's free-block count returns
to where it started. The 5 s is a quiet machine's bound, stretched by the load (`loaded_bound`): at a load
average of 10 on 2 cores every process runs ~5x slower, and a fixed 5 s failed there on an abort that took
7 s. One difference is by design: over NIXL a decode reservation whose prefill worker vanished while it
could still WRITE stays quarantined for the fence grace period (receiver.py: 6 s past the connection's
end), so those blocks come back that much later."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import pytest
import torch

from tests.greedy import assert_greedy_match, ref_greedy
from tests.runtime.deployment import Deployment, loaded_bound
from tests.tiny_models import make_tiny_checkpoint

QUIET_BOUND_S = 5.0
PROMPT = list(range(10, 70))
COMMON = ["--block-size", "16", "--num-blocks", "256", "--max-model-len", "1024", "--no-conditional"]
FENCE_GRACE_S = 6.0  # NIXL KVReceiver's default quarantine of a vanished writer's reservation
STALL_S = 2.0  # KVReceiver's default idle limit on a sender's control connection


def _nixl_missing() -> bool:
    from splitserve.transfer.nixl_agent import module_name

    return module_name() is None


TRANSPORTS = pytest.mark.parametrize(
    "transfer",
    ["tcp", pytest.param("nixl", marks=pytest.mark.skipif(_nixl_missing(), reason="NIXL not installed (make test installs it)"))],
)


def fence_grace(transfer: str) -> float:
    return FENCE_GRACE_S if transfer == "nixl" else 0.0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("faults"), layers=3, seed=11)


@pytest.fixture(scope="module")
def hf(checkpoint):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


def stream_tokens(url: str, prompt: list[int], max_tokens: int):
    """Yield (arrival time, chunk) of a streamed completion."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield time.monotonic(), json.loads(line[6:])


def complete_ids(url: str, prompt: list[int], max_tokens: int) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    return httpx.post(url + "/v1/completions", json=body, timeout=30)


def assert_blocks_back(dep: Deployment, before: dict, survivors: list[str]) -> None:
    after = dep.wait_all_free()
    for url in survivors:
        assert after[url][0] == before[url][0] == after[url][1], f"{url}: {after[url]} vs {before[url]}"


def stream_signalling_a_busy_decode_worker(dep: Deployment, n: int, sig: int) -> tuple[dict, float, list[str]]:
    """Stream n tokens of PROMPT and send `sig` to the first decode worker seen busy with it: the victim, the
    gap between the signal and the next chunk, and the chunks' texts. A stopped victim is resumed if the
    stream fails, so the deployment can shut down."""
    victim, hit_at, gap, texts = None, None, None, []
    try:
        for arrived, chunk in stream_tokens(dep.url, PROMPT, n):
            assert "error" not in chunk, chunk
            texts.append(chunk["choices"][0]["text"])
            if hit_at is not None and gap is None:
                gap = arrived - hit_at
            if victim is None:
                busy = [w for w in dep.workers("decode") if w["in_flight"] > 0]
                if busy:
                    victim = busy[0]
                    os.kill(victim["pid"], sig)
                    hit_at = time.monotonic()
    except BaseException:
        if victim is not None and sig == signal.SIGSTOP:
            os.kill(victim["pid"], signal.SIGCONT)
        raise
    assert victim is not None, "no decode worker was busy"
    assert gap is not None, "the stream ended at the signal"
    return victim, gap, texts


@TRANSPORTS
def test_client_abort_frees_blocks_everywhere(checkpoint, transfer):
    with Deployment(checkpoint, "--prefill", "1", "--decode", "1", "--transfer", transfer, *COMMON) as dep:
        before = dep.free_blocks()
        for i, _ in enumerate(stream_tokens(dep.url, PROMPT, 900)):
            if i == 2:
                break  # the client goes away mid-stream
        closed = time.monotonic()
        while dep.requests() == [] and time.monotonic() - closed < loaded_bound(QUIET_BOUND_S):
            time.sleep(0.05)
        assert_blocks_back(dep, before, list(before))
        assert time.monotonic() - closed < loaded_bound(QUIET_BOUND_S)
        (rec,) = dep.requests()
        assert rec["path"] == "split" and rec["output_tokens"] < 900


@TRANSPORTS
def test_killed_prefill_worker_is_recomputed_on_decode(checkpoint, hf, transfer):
    ref_tokens, ref_logits = ref_greedy(hf, PROMPT, 12)
    with Deployment(checkpoint, "--prefill", "1", "--decode", "1", "--transfer", transfer, *COMMON) as dep:
        assert complete_ids(dep.url, PROMPT[:20], 2).status_code == 200  # the KV connection exists
        before = dep.free_blocks()
        (p,) = dep.workers("prefill")
        (d,) = dep.workers("decode")
        os.kill(p["pid"], signal.SIGSTOP)  # frozen: the request is stuck at the prefill step (over NIXL, with
        result = {}  # its ticket claimed, before or between WRITEs)...
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
        after = dep.wait_all_free(timeout=fence_grace(transfer) + QUIET_BOUND_S)
        assert after[d["url"]][0] == before[d["url"]][0] == after[d["url"]][1]


@TRANSPORTS
def test_killed_decode_worker_mid_stream_continues_elsewhere(checkpoint, hf, transfer):
    # Over NIXL the dead decode worker's agent is gone with it: the prefill side's WRITEs to it fail and the
    # request continues on the surviving decode worker, as over TCP.
    n = 600
    ref_tokens, ref_logits = ref_greedy(hf, PROMPT, n)
    with Deployment(checkpoint, "--prefill", "1", "--decode", "2", "--transfer", transfer, *COMMON) as dep:
        before = dep.free_blocks()
        victim, gap_after_kill, text = stream_signalling_a_busy_decode_worker(dep, n, signal.SIGKILL)
        assert gap_after_kill < loaded_bound(QUIET_BOUND_S)
        (rec,) = dep.requests()
        assert rec["path"] == "recompute" and rec["finish_reason"] == "length", rec
        assert rec["output_tokens"] == n
        survivors = [u for u in before if u != victim["url"]]
        assert_blocks_back(dep, before, survivors)
        # The continuation after the failover is what a healthy run (checked against transformers) says.
        r = complete_ids(dep.url, PROMPT, n).json()["choices"][0]
        assert_greedy_match(r["token_ids"], ref_tokens, ref_logits)
        assert "".join(text) == r["text"]


@TRANSPORTS
def test_stalled_prefill_worker_times_out_and_recomputes(checkpoint, hf, transfer):
    ref_tokens, ref_logits = ref_greedy(hf, PROMPT, 8)
    args = ["--prefill", "1", "--decode", "1", "--transfer-deadline", "2", "--transfer-deadline-per-token", "0"]
    with Deployment(checkpoint, *args, "--transfer", transfer, *COMMON) as dep:
        assert complete_ids(dep.url, PROMPT[:20], 4).status_code == 200  # the KV connection exists and beats
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
            # Over NIXL the frozen sender holds a claim it may still WRITE: the blocks come back once its
            # silent connection is dropped (the idle limit) and the grace period has passed.
            # Widened (twice the idle limit and the quiet bound): the sum of the three was missed once in a quiet
            # clean-clone run (254 of 256 blocks back); the release waits on the receiver's idle check.
            grace = fence_grace(transfer) and 2 * STALL_S + fence_grace(transfer)
            after = dep.wait_all_free(timeout=grace + 2 * QUIET_BOUND_S)
            assert after[d["url"]][0] == before[d["url"]][0] == after[d["url"]][1]
        finally:
            os.kill(p["pid"], signal.SIGCONT)
        # Once it runs again, the stale prefill finds its ticket gone and gives its blocks back too.
        end = time.monotonic() + loaded_bound(QUIET_BOUND_S)
        while (stats := dep.operator.get(p["url"] + "/internal/stats", timeout=5).json())["num_free_blocks"] != before[p["url"]][0]:
            assert time.monotonic() < end, stats
            time.sleep(0.1)


@TRANSPORTS
def test_passed_deadline_fails_with_a_clear_error(checkpoint, transfer):
    args = ["--prefill", "1", "--decode", "1", "--transfer-deadline", "0", "--transfer-deadline-per-token", "0",
            "--on-transfer-failure", "fail"]
    with Deployment(checkpoint, *args, "--transfer", transfer, *COMMON) as dep:
        before = dep.free_blocks()
        start = time.monotonic()
        r = complete_ids(dep.url, PROMPT, 8)
        assert time.monotonic() - start < loaded_bound(QUIET_BOUND_S)
        assert r.status_code == 500
        assert "deadline" in r.json()["error"]["message"]
        assert_blocks_back(dep, before, list(before))
