"""`--prefill-resources` / `--decode-resources` specs become the options Ray places each actor with."""

from __future__ import annotations

import pytest

from splitserve.cluster.resources import PoolResources, parse_resources


def test_default_is_one_cpu():
    assert parse_resources(None) == parse_resources("") == PoolResources(1.0, 0.0, {}, {})


def test_cpus_gpus_custom_resources_and_labels():
    r = parse_resources("CPU=8, gpu=1, decode_node=0.5, label:ray.io/accelerator-type=H100")
    assert r.actor_options() == {
        "num_cpus": 8.0, "num_gpus": 1.0, "resources": {"decode_node": 0.5},
        "label_selector": {"ray.io/accelerator-type": "H100"},
    }
    assert r.threads() == 8


def test_fractional_cpu_still_gets_a_thread():
    assert parse_resources("CPU=0.5").threads() == 1


@pytest.mark.parametrize("spec, message", [
    ("CPU", "not KEY=VALUE"),
    ("=1", "not KEY=VALUE"),
    ("GPU=one", "not a number"),
    ("prefill_node=-1", "negative"),
])
def test_bad_specs_name_the_item(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_resources(spec)
