"""Scheduler: `prefill_tokens_while_decoding` bounds the prompt tokens of every step that decodes (issue 19:
a decode worker's recompute stalled its running requests for a whole prompt's prefill)."""

from hypothesis import given, settings, strategies as st
import pytest

from splitserve.core.blocks import BlockPool
from splitserve.core.request import Request, SamplingParams
from splitserve.core.scheduler import Scheduler, SchedulerConfig

from tests.core.test_scheduler import FakeModel, reference


def _sched(cap: int | None, budget: int = 512, blocks: int = 256) -> Scheduler:
    cfg = SchedulerConfig(max_model_len=1024, max_num_batched_tokens=budget, enable_chunked_prefill=True,
                          prefill_tokens_while_decoding=cap)
    return Scheduler(cfg, BlockPool(blocks, 4, enable_prefix_caching=False))


def _req(rid: str, prompt_len: int, out: int, seed: int = 0) -> Request:
    return Request(rid, [(seed * 7 + i * 3) % 97 for i in range(prompt_len)], SamplingParams(max_tokens=out, ignore_eos=True), 0.0)


def _drive(sched: Scheduler, arrivals: dict[int, list[Request]], cap: int | None) -> tuple[dict[str, list[int]], list[int]]:
    """Run to the end, adding arrivals[step] before that step; checks the cap on every step that decodes.
    Returns the outputs and, per step, its prompt tokens."""
    model, reqs, prompt_tokens, step = FakeModel(sched.pool), [], [], 0
    while sched.has_work() or any(k >= step for k in arrivals):
        for r in arrivals.get(step, []):
            sched.add_request(r)
            reqs.append(r)
        out = sched.schedule(now=float(step))
        chunk = sum(s.num_new_tokens for s in out.seqs if s.num_new_tokens > 1)
        decodes = sum(1 for s in out.seqs if s.num_new_tokens == 1 and s.start_pos >= s.request.num_prompt_tokens)
        if cap is not None and decodes:
            assert chunk <= cap, f"step {step}: {chunk} prompt tokens beside {decodes} decodes"
        prompt_tokens.append(chunk)
        sched.update(out, model.step(out))
        step += 1
        assert step < 5000, "no progress"
    return {r.request_id: r.output_token_ids for r in reqs}, prompt_tokens


def test_a_prompt_beside_a_decode_goes_in_chunks_of_the_cap_and_the_decode_never_waits():
    sched = _sched(cap=8)
    decoding, prompt = _req("d", 6, 40), _req("p", 100, 3, seed=1)
    outs, chunks = _drive(sched, {0: [decoding], 3: [prompt]}, cap=8)
    assert outs == {"d": reference(decoding.prompt_token_ids, 40), "p": reference(prompt.prompt_token_ids, 3)}
    assert max(chunks[3:]) == 8  # 100 tokens over 13 steps, each beside one decode token
    assert sched.pool.num_free_blocks == sched.pool.num_blocks


def test_with_nothing_decoding_a_prompt_goes_whole():
    sched = _sched(cap=8)
    outs, chunks = _drive(sched, {0: [_req("p", 100, 2)]}, cap=8)
    assert chunks[0] == 100
    assert sched.pool.num_free_blocks == sched.pool.num_blocks


def test_without_the_cap_the_prompt_stalls_the_decode_for_its_whole_length():
    sched = _sched(cap=None)
    _, chunks = _drive(sched, {0: [_req("d", 6, 40)], 3: [_req("p", 100, 3, seed=1)]}, cap=None)
    assert max(chunks[3:]) == 100


def test_the_cap_must_be_positive():
    with pytest.raises(ValueError, match="prefill_tokens_while_decoding"):
        SchedulerConfig(max_model_len=64, enable_chunked_prefill=True, prefill_tokens_while_decoding=0)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.lists(st.tuples(st.integers(0, 30), st.integers(1, 120), st.integers(1, 20)),
                                    min_size=1, max_size=8))
def test_any_arrivals_give_the_reference_outputs_within_the_cap_and_return_every_block(cap, specs):
    sched = _sched(cap=cap, budget=64, blocks=400)
    arrivals: dict[int, list[Request]] = {}
    for i, (at, plen, out) in enumerate(specs):
        arrivals.setdefault(at, []).append(_req(f"r{i}", plen, out, seed=i))
    outs, _ = _drive(sched, arrivals, cap=cap)
    for i, (_, plen, out) in enumerate(specs):
        assert outs[f"r{i}"] == reference(_req("x", plen, out, seed=i).prompt_token_ids, out)
    assert sched.pool.num_free_blocks == sched.pool.num_blocks
