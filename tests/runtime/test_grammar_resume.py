"""A constrained request resumed from tokens produced elsewhere — the decode worker after the prefill
worker's first token, a recompute after a failed transfer — continues from the grammar state those tokens
reached: the same continuation as the uninterrupted run, and still inside the grammar."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.core.request import GrammarSpec, SamplingParams
from splitserve.model.loader import load_model
from splitserve.runtime.worker.engine import Engine, EngineConfig
from splitserve.runtime.worker.grammar import GrammarMasks
from splitserve.runtime.worker.sampler import Sampler
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


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), cut=st.integers(0, 24), temperature=st.sampled_from([0.0, 0.9]))
def test_a_fresh_sampler_resumes_the_grammar_from_any_cut(loaded, seed, cut, temperature):
    """Property: whatever logits come, a sampler that never saw the request (another worker) and is handed
    the first `cut` tokens makes the same choices from there as the one that made them."""
    tok = loaded.tokenizer
    vocab = loaded.config.vocab_size
    params = SamplingParams(max_tokens=24, temperature=temperature, seed=seed, grammar=GrammarSpec("regex", REGEX))
    gen = torch.Generator().manual_seed(seed)
    steps = [torch.randn(1, vocab, generator=gen) * 4 for _ in range(24)]

    def continue_from(sampler: Sampler, tokens: list[int], start: int) -> list[int]:
        tokens = list(tokens)
        for logits in steps[start:]:
            if tokens and tokens[-1] in tok.eos_token_ids:
                break
            tokens += sampler.sample(logits, ["r"], [params], [tokens])
        return tokens

    whole = continue_from(Sampler(GrammarMasks(tok, vocab)), [], 0)
    cut = min(cut, len(whole))
    resumed = continue_from(Sampler(GrammarMasks(tok, vocab)), whole[:cut], cut)
    if temperature == 0:
        assert resumed == whole
    text = tok.decode([t for t in resumed if t not in tok.eos_token_ids])
    if resumed[-1] in tok.eos_token_ids:
        assert re.fullmatch(REGEX, text), text
    else:  # cut short by the step budget: a prefix of some match
        assert re.fullmatch("[a-z]{0,8}( [0-9]{0,3}){0,4};?", text), text
