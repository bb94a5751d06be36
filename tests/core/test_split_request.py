"""SplitRequest: each path's actions, and properties over any event sequence (a legal transition or a clear
error; terminal stays terminal; nothing reserved is leaked; a recompute continues after what was emitted)."""

import pytest
from hypothesis import given, settings, strategies as st

from splitserve.core.request import SamplingParams
from splitserve.core.split_request import (
    Abort, Deadline, Emit, Fail, FirstToken, KvComplete, PeerFailed, Recompute, Refused, Release, Reserve,
    Reserved, Retry, Routed, SendPrompt, SplitRequest, SplitRequestError, State, Suspect, Tokens, TransferFailed,
    WorkerLost,
)

EOS = 2


def make(max_tokens=4, policy="recompute") -> SplitRequest:
    return SplitRequest(SamplingParams(max_tokens=max_tokens), frozenset({EOS}), 10, 1000, policy)


def run(split: SplitRequest, *events) -> list:
    return [a for ev in events for a in split.handle(ev, 1.0)]


def placed(**kw) -> SplitRequest:
    split = make(**kw)
    run(split, Routed("d", "p"), Reserved(16))
    return split


def test_a_normal_request():
    split = make()
    assert run(split, Routed("d", "p")) == [Reserve("d")]
    assert split.handle(Reserved(16), 2.0) == [SendPrompt("p", "d")]
    assert split.handle(FirstToken(5, 8, 0.1, 0.2), 3.0) == [Emit((5,))]
    assert split.handle(KvComplete(), 3.5) == []
    assert run(split, Tokens((6,)), Tokens((7, 8), "length")) == [Emit((6,)), Emit((7, 8), True, "length")]
    assert split.state is State.DONE and split.emitted == [5, 6, 7, 8]
    assert (split.decode_cached_tokens, split.cached_tokens, split.reserved_at, split.first_token_at) == (16, 8, 2.0, 3.0)
    assert split.kv_wait_s == 1.5  # measured here when D does not say


def test_a_first_token_that_ends_the_request_releases_the_reservation():
    split = placed(max_tokens=1)
    assert run(split, FirstToken(5, 0, 0, 0)) == [Emit((5,), True, "length"), Release("d", "decode")]
    split = placed()
    assert run(split, FirstToken(EOS, 0, 0, 0)) == [Emit((EOS,), True, "stop"), Release("d", "decode")]


def test_no_room_routes_again_and_a_rejection_fails():
    split = make()
    assert run(split, Routed("d", "p"), Refused()) == [Reserve("d"), Retry()]
    assert split.state is State.ROUTING
    assert run(split, Routed("d2", "p2"), Reserved(0)) == [Reserve("d2"), SendPrompt("p2", "d2")]
    split = make()
    assert run(split, Routed("d", "p"), Refused("prompt too long")) == [Reserve("d"), Fail("refused", "prompt too long")]


def test_a_failed_reserve_call_makes_the_worker_suspect_and_routes_again():
    split = make()
    assert run(split, Routed("d", "p"), PeerFailed("decode", "refused")) == [Reserve("d"), Suspect("d"), Retry()]
    assert split.state is State.ROUTING and split.causes == ["refused"]


def test_the_decode_worker_may_speak_before_the_first_token_comes_back():
    split = placed()
    assert run(split, KvComplete(0.3), Tokens((6,)), Tokens((7,))) == []
    assert run(split, FirstToken(5, 0, 0, 0)) == [Emit((5,)), Emit((6,)), Emit((7,))]
    assert run(split, Tokens((8,), "length")) == [Emit((8,), True, "length")]
    assert split.kv_wait_s == 0.3
    # D ended it on the first token, which is still on its way: nothing left to release.
    split = placed(max_tokens=1)
    assert run(split, Tokens((), "length"), FirstToken(5, 0, 0, 0)) == [Emit((5,), True, "length")]


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_every_failure_releases_what_is_held_then_recomputes_or_fails(policy):
    def end(cause, decode):
        return [Recompute(decode, ())] if policy == "recompute" else [Fail("transfer_failed", f"KV transfer failed: {cause}")]

    split = placed(policy=policy)
    assert run(split, PeerFailed("prefill", "p down")) == [Suspect("p"), Release("d", "decode"), *end("p down", "d")]
    split = placed(policy=policy)
    assert run(split, PeerFailed("decode", "d down")) == [WorkerLost("d"), Release("p", "prefill"), *end("d down", None)]
    split = placed(policy=policy)
    assert run(split, TransferFailed("stalled")) == [Release("p", "prefill"), *end("stalled", "d")]
    split = placed(policy=policy)
    assert run(split, Deadline()) == [Suspect("p"), Release("p", "prefill"), Release("d", "decode"),
                                      *end("no first token within the transfer deadline", "d")]
    split = placed(policy=policy)
    assert run(split, Tokens((), "error", "boom")) == [Release("p", "prefill"), *end("boom", "d")]
    assert split.causes == ["boom"] and split.state is (State.RECOMPUTE if policy == "recompute" else State.FAILED)


def test_a_decode_worker_lost_mid_stream_is_recomputed_elsewhere_after_the_tokens_sent():
    split = placed()
    run(split, FirstToken(5, 0, 0, 0), Tokens((6,)))
    assert run(split, PeerFailed("decode", "gone")) == [WorkerLost("d"), Recompute(None, (5, 6))]


def test_an_abort_releases_both_sides_while_prefilling_and_only_the_decode_side_after():
    split = placed()
    assert run(split, Abort()) == [Release("p", "prefill"), Release("d", "decode")]
    split = placed()
    assert run(split, FirstToken(5, 0, 0, 0), Abort()) == [Emit((5,)), Release("d", "decode")]
    split = make()
    assert run(split, Abort()) == [] and split.state is State.ABORTED


def test_an_illegal_event_is_a_clear_error_and_changes_nothing():
    split = make()
    with pytest.raises(SplitRequestError, match="FirstToken in state routing"):
        split.handle(FirstToken(5, 0, 0, 0), 0.0)
    assert split.state is State.ROUTING
    split = placed()
    run(split, KvComplete())
    with pytest.raises(SplitRequestError, match="TransferFailed in state prefilling"):
        split.handle(TransferFailed("late"), 0.0)  # the KV is complete: nothing left to fail
    with pytest.raises(SplitRequestError, match="not an event"):
        split.handle("reserved", 0.0)


EVENTS = st.sampled_from([
    Routed("d", "p"), Reserved(0), Refused(), Refused("no"), FirstToken(5, 0, 0, 0), FirstToken(EOS, 0, 0, 0),
    KvComplete(), Tokens((6,)), Tokens((7,), "length"), Tokens((), "stop"), Tokens((), "error", "x"),
    PeerFailed("prefill", "x"), PeerFailed("decode", "x"), TransferFailed("x"), Deadline(), Abort(),
])


@settings(max_examples=400, deadline=None)
@given(st.lists(EVENTS, max_size=14), st.sampled_from(["recompute", "fail"]), st.integers(1, 4))
def test_any_event_sequence(events, policy, max_tokens):
    split = make(max_tokens, policy)
    holds = {"prefill": False, "decode": False}  # kept here from events and actions alone
    emitted: list[int] = []
    for ev in events:
        was, terminal = split.state, split.done
        try:
            actions = split.handle(ev, 0.0)
        except SplitRequestError:
            assert split.state is was  # refused whole
            continue
        assert not terminal, f"{type(ev).__name__} accepted after {was}"
        if isinstance(ev, (FirstToken, PeerFailed)) and (ev.__class__ is FirstToken or ev.side == "prefill"):
            holds["prefill"] = False
        if isinstance(ev, (TransferFailed, PeerFailed)) and (ev.__class__ is TransferFailed or ev.side == "decode"):
            holds["decode"] = False
        if isinstance(ev, Tokens) and ev.finish_reason is not None:
            holds["decode"] = False
        for a in actions:
            assert not (isinstance(a, Emit) and emitted and emitted[-1] is None), "output after the last"
            if isinstance(a, SendPrompt):
                holds["prefill"] = holds["decode"] = True
            elif isinstance(a, Release):
                assert holds[a.side], f"released {a.side} twice"
                holds[a.side] = False
            elif isinstance(a, Emit):
                emitted += a.tokens
                if a.finished:
                    emitted.append(None)
            elif isinstance(a, Recompute):
                assert a.produced == tuple(emitted), "a recompute continues after exactly the tokens emitted"
        if split.done:
            assert not any(holds.values()), f"{split.state}: a reservation or prefill leaked"
    if split.state is State.DONE:
        assert emitted[-1] is None  # the client saw the end
