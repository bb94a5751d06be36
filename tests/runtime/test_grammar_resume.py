"""A constrained request resumed from tokens produced elsewhere — the decode worker after the prefill
worker's first token, a recompute after a failed transfer — continues from the grammar state those tokens
reached: the same continuation as the uninterrupted run, and still inside the grammar."""

from __future__ import annotations

import re

import pytest

from splitserve.core.request import GrammarSpec, SamplingParams
from splitserve.model.loader import load_model
from splitserve.runtime.worker.engine import Engine, EngineConfig
from tests.tiny_models import make_tiny_checkpoint

REGEX = "[a-z]{3,8}( [0-9]{1,3}){2,4};"


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_model(make_tiny_checkpoint(tmp_path_factory.mktemp("resume"), seed=4))


def run(engine: Engine, rid: str, prompt: list[int], params: SamplingParams, produced: list[int] = ()) -> list[int]:
    engine.add_request(rid, prompt, params, 0.0, output_token_ids=list(produced))
    tokens = list(produced)
    while engine.has_work():
        for out in engine.step(0.0):
            tokens += out.new_token_ids
    return tokens


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_recompute_resumes_the_grammar_where_the_tokens_left_it(loaded, temperature):
    params = SamplingParams(max_tokens=40, temperature=temperature, seed=7, grammar=GrammarSpec("regex", REGEX))
    prompt = loaded.tokenizer.encode("The quick brown fox")
    whole = run(Engine(loaded, EngineConfig(num_blocks=32)), "a", prompt, params)
    text = loaded.tokenizer.decode(whole)
    assert re.fullmatch(REGEX, text), text
    for cut in (1, len(whole) // 2):
        engine = Engine(loaded, EngineConfig(num_blocks=32))
        resumed = run(engine, "b", prompt, params, whole[:cut])
        if temperature == 0:  # greedy: exactly the uninterrupted run
            assert resumed == whole
        assert re.fullmatch(REGEX, loaded.tokenizer.decode(resumed)), loaded.tokenizer.decode(resumed)
        assert engine.load().free_blocks == engine.load().total_blocks


def test_a_batch_mixes_constrained_and_free_rows(loaded):
    """One masked batch: each constrained row keeps to its own grammar, and a free row is untouched
    (greedy: the same tokens as when it runs alone)."""
    prompt = loaded.tokenizer.encode("Paris is")
    free = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    alone = run(Engine(loaded, EngineConfig(num_blocks=64)), "free", prompt, free)
    engine = Engine(loaded, EngineConfig(num_blocks=64))
    specs = {"r": GrammarSpec("regex", REGEX), "c": GrammarSpec("ebnf", 'root ::= "yes" | "no"')}
    for rid, spec in specs.items():
        engine.add_request(rid, prompt, SamplingParams(max_tokens=40, temperature=0, grammar=spec), 0.0)
    engine.add_request("free", prompt, free, 0.0)
    tokens: dict[str, list[int]] = {"r": [], "c": [], "free": []}
    while engine.has_work():
        for out in engine.step(0.0):
            tokens[out.request_id] += out.new_token_ids
    assert tokens["free"] == alone
    assert re.fullmatch(REGEX, loaded.tokenizer.decode(tokens["r"]))
    assert loaded.tokenizer.decode(tokens["c"]) in ("yes", "no")
