"""Tokenizer loading from a checkpoint directory, BOS policy, chat templates and streaming detokenization."""

from __future__ import annotations

import json
import shutil

import jinja2
import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import processors

from splitserve.model.loader import load_tokenizer
from splitserve.model.tokenizer import IncrementalDetokenizer, Tokenizer
from tests.tiny_models import make_tiny_checkpoint

TEXTS = [
    "Hello world, the quick brown fox.",
    "  spaces  and\ttabs\n\nnewlines ",
    "Caf\u00e9 \u65e5\u672c\u8a9e \U0001f600\u2764\ufe0f \u0440\u0443\u0441\u0441\u043a\u0438\u0439",
    "def f(x):\n    return x * 42\n",
    "<|im_start|>user\nhi<|im_end|>",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def tokenizer(request, tiny_dir) -> Tokenizer:
    return load_tokenizer(tiny_dir if request.param == "tiny" else None)[0]


def test_hf_dir_matches_transformers(tiny_dir):
    from transformers import AutoTokenizer

    ours, name = load_tokenizer(tiny_dir)
    ref = AutoTokenizer.from_pretrained(tiny_dir)
    assert name == tiny_dir.name
    assert ours.vocab_size == len(ref) == 384
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text)
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert ours.apply_chat_template(messages) == ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


def test_bos_from_config_flag_without_doubling(tiny_dir, tmp_path):
    d = shutil.copytree(tiny_dir, tmp_path / "bos")
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    tok = Tokenizer.from_hf_dir(d)
    bos = tok.bos_token_id
    plain = tok.encode("hi", add_special_tokens=False)
    assert tok.encode("hi") == [bos] + plain
    # A template that writes the BOS itself gets no second one.
    assert tok.encode("<|im_start|>hi") == [bos] + plain


def test_bos_from_post_processor(tiny_dir, tmp_path):
    """Llama 3 style: no add_bos_token flag, tokenizer.json's post-processor adds it."""
    d = shutil.copytree(tiny_dir, tmp_path / "post")
    backend = Backend.from_file(str(d / "tokenizer.json"))
    bos = backend.token_to_id("<|im_start|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)]
    )
    backend.save(str(d / "tokenizer.json"))
    config = json.loads((d / "tokenizer_config.json").read_text())
    del config["add_bos_token"]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_hf_dir(d)
    assert tok.encode("hi")[:2] == [bos, tok.encode("hi", add_special_tokens=False)[0]]
    assert tok.encode("<|im_start|>hi").count(bos) == 1


def test_eos_ids_gathered_from_all_configs(tiny_dir, tmp_path):
    d = shutil.copytree(tiny_dir, tmp_path / "eos")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = Tokenizer.from_hf_dir(d)
    assert tok.eos_token_ids == {0, 2}
    assert tok.apply_chat_template([], add_generation_prompt=True) == "<|im_start|>assistant\n"


def test_chat_template_features(tokenizer):
    tok = Tokenizer(
        tokenizer.backend,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=tokenizer.eos_token_ids,
        add_bos_token=False,
        chat_template=(
            "{% if messages[0]['role'] == 'bad' %}{{ raise_exception('bad role') }}{% endif %}"
            "{{ bos_token }}{% for m in messages %}{{ m['role'] }}={{ m['content'] }};{% endfor %}{{ eos_token }}"
        ),
    )
    parts = [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}, {"type": "text", "text": "b"}]
    assert tok.apply_chat_template([{"role": "user", "content": parts}]) == "<|im_start|>user=ab;<|im_end|>"
    with pytest.raises(jinja2.TemplateError, match="bad role"):
        tok.apply_chat_template([{"role": "bad", "content": "x"}])
    # The sandbox refuses reaching into Python internals.
    evil = Tokenizer(tokenizer.backend, bos_token_id=None, eos_token_ids=[], add_bos_token=False,
                     chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        evil.apply_chat_template([])
    no_template = Tokenizer(tokenizer.backend, bos_token_id=None, eos_token_ids=[], add_bos_token=False,
                            chat_template=None)
    with pytest.raises(ValueError, match="no chat template"):
        no_template.apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("step", [1, 3])
def test_incremental_detokenizer_streams_whole_characters(tokenizer, step):
    prompt = tokenizer.encode("Prompt: ")
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        detok = IncrementalDetokenizer(tokenizer, prompt)
        deltas = [detok.add(ids[i : i + step]) for i in range(0, len(ids), step)]
        assert "".join(deltas) == tokenizer.decode(ids)
        assert not any("\ufffd" in d for d in deltas)
