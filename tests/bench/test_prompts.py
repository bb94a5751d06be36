"""splitserve.bench.prompts: exact lengths, shared blocks give shared tokens, nothing else is shared."""

from __future__ import annotations

import pytest

from splitserve.bench.prompts import PromptBuilder
from splitserve.bench.vocab import Vocab, VocabError, load_vocab
from splitserve.workload.requests import RequestSpec


def spec(n: int, blocks: tuple[int, ...] = (), block_tokens: int = 16) -> RequestSpec:
    return RequestSpec(0.0, n, 4, blocks, block_tokens)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def test_prompts_have_exactly_the_requested_length_and_no_special_ids(vocab):
    b = PromptBuilder(vocab, salt=1)
    for i, s in enumerate([spec(1), spec(37), spec(40, (1, 2)), spec(20, (1, 2, 3)), spec(5, (9,))]):
        p = b.build(i, s)
        assert len(p) == s.input_len
        assert all(0 <= t < vocab.size and t not in vocab.special_ids for t in p)


def test_equal_block_ids_give_equal_tokens_and_the_rest_differs(vocab):
    b = PromptBuilder(vocab, salt=7)
    x = b.build(0, spec(100, (5, 6, 7)))
    y = b.build(1, spec(100, (5, 6, 8)))
    z = b.build(2, spec(100, (4, 6, 7)))
    # Shared leading blocks, then the first different block: equal exactly as far as the ids agree.
    assert x[:32] == y[:32]
    assert common_prefix(x, y) < 34  # random tokens may agree by chance for a token or so, not a block
    assert common_prefix(x, z) < 2
    # Blocks past the prompt's end are cut; a partial last block is a prefix of the full one.
    assert b.build(3, spec(40, (5, 6, 7)))[:40] == x[:40]


def test_same_salt_is_reproducible_and_another_salt_shares_nothing(vocab):
    s = spec(64, (1, 2))
    assert PromptBuilder(vocab, 3).build(0, s) == PromptBuilder(vocab, 3).build(0, s)
    assert common_prefix(PromptBuilder(vocab, 3).build(0, s), PromptBuilder(vocab, 4).build(0, s)) < 2


def test_requests_without_shared_blocks_share_no_prefix(vocab):
    b = PromptBuilder(vocab, salt=0)
    prompts = [b.build(i, spec(64)) for i in range(20)]
    assert max(common_prefix(p, q) for i, p in enumerate(prompts) for q in prompts[i + 1 :]) < 3


def test_a_vocabulary_of_only_special_tokens_is_refused():
    with pytest.raises(VocabError):
        PromptBuilder(Vocab(2, frozenset({0, 1}), "x"), 0)


def test_vocab_from_a_checkpoint_excludes_its_special_tokens(tiny_checkpoint):
    v = load_vocab(tiny_checkpoint)
    assert v.size == 384
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))
    for name in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert tok.token_to_id(name) in v.special_ids


def test_missing_tokenizer_is_a_vocab_error(tmp_path):
    with pytest.raises(VocabError, match="no tokenizer"):
        load_vocab(tmp_path)
