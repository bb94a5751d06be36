"""1 prefill + 1 decode worker processes produce, for concurrent prompts (some sharing prefixes), the
same greedy tokens as transformers and as a colocated engine, over every transport (nixl: DRAM over UCX), with and without
layer pipelining; every request really took the split path; every block comes back."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest
import torch

from tests.greedy import assert_greedy_match, ref_greedy
from tests.runtime.deployment import Deployment
from tests.tiny_models import make_tiny_checkpoint

MAX_NEW = 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("split"), layers=3, seed=5)


def prompts(seed: int = 7) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, 380) for _ in range(48)]
    ps = [[rng.randrange(3, 380) for _ in range(rng.randint(1, 90))] for _ in range(14)]
    ps += [shared + [rng.randrange(3, 380) for _ in range(rng.randint(0, 30))] for _ in range(8)]
    return ps


@pytest.fixture(scope="module")
def references(checkpoint):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.float32).eval()
    return [ref_greedy(hf, p, MAX_NEW) for p in prompts()]


async def _complete_all(url: str, ps: list[list[int]]) -> list[dict]:
    async with httpx.AsyncClient(timeout=60) as client:
        async def one(p):
            r = await client.post(url + "/v1/completions",
                                  json={"prompt": p, "max_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True,
                                        "return_token_ids": True})
            assert r.status_code == 200, r.text
            return r.json()
        return await asyncio.gather(*(one(p) for p in ps))


@pytest.mark.parametrize("transport", ["tcp", "shm", "nixl"])
@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "after-last-layer"])
def test_split_is_token_identical(checkpoint, references, transport, pipelining):
    args = ["--prefill", "1", "--decode", "1", "--transfer", transport, "--block-size", "16", "--num-blocks", "256",
            "--no-conditional"]
    if not pipelining:
        args.append("--no-layer-pipelining")
    ps = prompts()
    with Deployment(checkpoint, *args) as dep:
        before = dep.free_blocks()
        results = asyncio.run(_complete_all(dep.url, ps))
        # A second wave of the prefix-sharing prompts finds their prefix cached on both workers.
        again = asyncio.run(_complete_all(dep.url, ps[-8:]))
        for (ref_tokens, ref_logits), res in zip(references + references[-8:], results + again):
            assert_greedy_match(res["choices"][0]["token_ids"], ref_tokens, ref_logits)
        records = dep.requests()
        assert len(records) == len(ps) + 8
        assert {r["path"] for r in records} == {"split"}, [r["events"] for r in records if r["events"]]
        assert all(r["prefill_worker"] and r["decode_worker"] for r in records)
        assert all(res["usage"]["prompt_tokens_details"]["cached_tokens"] >= 32 for res in again)
        # Only the missing suffix crossed the wire: the decode worker already held the shared blocks.
        assert all(r["decode_cached_tokens"] >= 32 for r in records[-8:])
        after = dep.wait_all_free()
        assert {u: f for u, (f, _) in after.items()} == {u: f for u, (f, _) in before.items()}
        assert all(free == total for free, total in after.values())
