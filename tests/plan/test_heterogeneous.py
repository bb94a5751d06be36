"""Issue #7: hardware per pool, prices and the cost verdict, memory fit."""


import pytest

from splitserve.workload.slo import SLO
from splitserve.plan import estimate as est
from splitserve.plan.cli import build_parser, spec_from_args
from splitserve.plan.candidates import enumerate_candidates
from splitserve.plan.search import plan
from splitserve.plan.spec import PlanSpec, WorkloadDef
from splitserve.sim import hardware, models
from splitserve.sim.hardware import GB, TERA, Hardware, PresetError, hour_price, load_prices, parse_prices
from splitserve.sim.perf import PerfModel
from splitserve.workload.requests import LengthDist, SyntheticSpec

# Same price; one has 4x the FLOP/s per dollar, the other 5x the bandwidth per dollar.
FLOPPY = Hardware("Floppy", 1600 * TERA, 1.0e12, 80 * GB, 450 * GB, gpu_hour_cost=2.0)
BANDY = Hardware("Bandy", 400 * TERA, 5.0e12, 80 * GB, 450 * GB, gpu_hour_cost=2.0)


def spec(**kw) -> PlanSpec:
    wl = WorkloadDef(synthetic=SyntheticSpec(rate=1, input=LengthDist("fixed", 2048), output=LengthDist("fixed", 64), num_requests=60),
                     num_requests=60)
    base = dict(model=models.model("llama-3.1-8b"), hardware=FLOPPY, network=hardware.network("rdma-400"), workload=wl,
                slo=SLO(1.0, 0.03), gpus=4, tp_options=(1,), chunk_options=(512,), top_k=2,
                max_requests=600, jobs=1)
    base.update(kw)
    return PlanSpec(**base)


def test_prices_parse_and_override_the_defaults():
    assert parse_prices(["H100=2.5", "a100-80gb=1.1"]) == {"h100": 2.5, "a100": 1.1}
    assert hour_price(hardware.gpu("h100")) == hardware.DEFAULT_PRICES["h100"] > 0
    assert hour_price(hardware.gpu("h100"), {"h100": 9.0}) == 9.0
    for bad in (["H100"], ["H100=x"], ["H100=-1"]):
        with pytest.raises(PresetError):
            parse_prices(bad)


def test_prices_file_json_or_lines(tmp_path):
    a = tmp_path / "p.json"
    a.write_text('{"H100": 3, "L40S": 0.9}')
    b = tmp_path / "p.txt"
    b.write_text("# mine\nh100=3\nl40s = 0.9\n")
    assert load_prices(a) == load_prices(b) == {"h100": 3.0, "l40s": 0.9}


def test_cli_builds_per_pool_hardware_and_prices(tmp_path):
    f = tmp_path / "p.json"
    f.write_text('{"a100": 1.5}')
    args = build_parser().parse_args(["--model", "llama-3.1-8b", "--prefill-gpu", "h100", "--decode-gpu", "a100", "--gpus", "8",
                                      "--slo-ttft", "1", "--slo-tpot", "0.05", "--price", "H100=2", "--prices-file", str(f)])
    s = spec_from_args(args)
    assert s.prefill_hardware.name == "H100-SXM" and s.decode_hardware.name == "A100-80GB"
    assert s.price(s.prefill_hardware) == 2.0 and s.price(s.decode_hardware) == 1.5
    args = build_parser().parse_args(["--model", "llama-3.1-8b", "--search-gpus", "h100,a100,l40s", "--gpus", "8",
                                      "--slo-ttft", "1", "--slo-tpot", "0.05"])
    assert [h.name for h in spec_from_args(args).search_hardware] == ["H100-SXM", "A100-80GB", "L40S"]


def test_memory_limits_are_respected():
    """No proposed pool lacks room for the weights plus the KV cache of the longest request."""
    s = spec(model=models.model("llama-3.1-70b"), hardware=hardware.gpu("h100"), gpus=16, tp_options=(1, 2, 4, 8),
             search_hardware=(hardware.gpu("h100"), hardware.gpu("l40s"), hardware.gpu("a100")))
    traffic = est.Traffic.of(s.workload.at(1.0).requests)
    longest = 90_000  # over an L40S TP4's KV room (~85k tokens) and an H100/A100 TP2's (~3k)
    cands = enumerate_candidates(s, traffic, longest)
    assert {c.mode for c in cands} == {"colocated", "disaggregated", "heterogeneous"}
    seen = set()
    for c in cands:
        for p in c.unit.pools:
            hw = p.hardware or c.unit.hardware
            assert PerfModel(s.model, hw, p.tp, s.efficiency).kv_capacity_tokens() >= longest
            seen.add((hw.name, p.tp))
    assert {tp for name, tp in seen if name == "L40S"} == {8}  # 70B + 90k tokens of KV needs all 8 x 48 GB
    assert ("H100-SXM", 2) not in seen and ("H100-SXM", 4) in seen


def test_heterogeneous_search_puts_prefill_on_flops_and_decode_on_bandwidth():
    r = plan(spec(search_hardware=(FLOPPY, BANDY), prices=(("floppy", 2.0), ("bandy", 2.0))))
    het = r.heterogeneous
    assert het is not None
    by_role = {u["role"]: u["hardware"] for u in het.utilisation}
    assert by_role == {"prefill": "Floppy", "decode": "Bandy"}
    # Costs: every mode priced, savings against colocated with a reason naming the cheaper hardware per phase.
    rows = {c["mode"]: c for c in r.costs}
    assert rows["heterogeneous"]["cost_per_m_tokens"] > 0 and rows["heterogeneous"]["saving_vs_colocated"] is not None
    assert "cheaper" in rows["heterogeneous"]["reason"]
    # Utilisation: prefill is compute-heavy, decode bandwidth-heavy.
    u = {x["role"]: x for x in het.utilisation}
    assert u["decode"]["bandwidth_util"] > u["decode"]["compute_util"]
    assert u["prefill"]["compute_util"] / u["prefill"]["bandwidth_util"] > u["decode"]["compute_util"] / u["decode"]["bandwidth_util"]
    assert abs(het.cost_per_hour - het.gpus * 2.0) < 1e-9


def test_fixed_pool_hardware_is_used_and_heterogeneous():
    r = plan(spec(prefill_hardware=FLOPPY, decode_hardware=BANDY, top_k=1))
    assert r.heterogeneous is not None and r.disaggregated is None
    assert [p["hardware"] for p in r.heterogeneous.pools] == ["Floppy", "Bandy"]
