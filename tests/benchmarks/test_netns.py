"""The pure parts of benchmarks.netns (making namespaces needs root and is exercised by the benchmarks)."""

from __future__ import annotations

from benchmarks.netns import PREFIX, stale_namespaces, tbf_args


def test_only_our_namespaces_of_dead_processes_are_stale():
    names = [f"{PREFIX}-10-1gbit-a", f"{PREFIX}-10-1gbit-b", f"{PREFIX}-20-loopback-a", "other-10-a", f"{PREFIX}-x-a"]
    assert stale_namespaces(names, alive=lambda pid: pid == 20) == names[:2]


def test_token_bucket_holds_two_ms_but_at_least_two_gso_segments():
    assert tbf_args(1e9)[:4] == ["tbf", "rate", "1000000000bit", "burst"]
    assert int(tbf_args(1e9)[4]) == 250_000
    assert int(tbf_args(1e8)[4]) == 128 << 10
