"""Engine flags: chunked prefill is on unless --no-chunked-prefill, and a worker started with the user's
engine options (engine_argv) gets the same engine config."""

from __future__ import annotations

import argparse

import pytest

from splitserve.runtime.config import add_engine_args, engine_argv, engine_config


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_engine_args(p)
    return p.parse_args(argv)


@pytest.mark.parametrize("argv, chunked", [([], True), (["--chunked-prefill"], True), (["--no-chunked-prefill"], False)])
def test_chunked_prefill_default_and_switch(argv, chunked):
    args = _parse(argv)
    assert engine_config(args).enable_chunked_prefill is chunked
    # The worker's command line carries the same choice.
    assert engine_config(_parse(engine_argv(args))) == engine_config(args)


def test_engine_argv_round_trips_other_options():
    args = _parse(["--no-prefix-caching", "--max-num-batched-tokens", "512", "--no-chunked-prefill"])
    again = _parse(engine_argv(args))
    assert engine_config(again) == engine_config(args)
    assert not engine_config(again).enable_prefix_caching


def test_a_decode_worker_caps_the_prompt_tokens_of_a_step_that_decodes(tmp_path):
    """Issue 19: a prompt computed on a decode worker (a recompute) stalled its running requests for the
    whole prefill; decode workers default to DECODE_PREFILL_CHUNK, other roles to no cap, the flag rules."""
    from splitserve.runtime.config import DECODE_PREFILL_CHUNK
    from splitserve.runtime.launch import build_engine
    from tests.tiny_models import make_tiny_checkpoint

    model = str(make_tiny_checkpoint(tmp_path / "tiny"))
    cap = lambda argv, role: build_engine(_parse(["--model", model, "--num-blocks", "64", *argv]), role).scheduler.config.prefill_tokens_while_decoding
    assert cap([], "decode") == DECODE_PREFILL_CHUNK
    assert cap([], "colocated") is None and cap([], "prefill") is None
    assert cap(["--prefill-chunk-while-decoding", "8"], "decode") == 8
    assert cap(["--prefill-chunk-while-decoding", "8"], "colocated") == 8
