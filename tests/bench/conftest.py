from __future__ import annotations

from pathlib import Path

import pytest

from splitserve.bench.vocab import Vocab
from tests.bench.fake_server import Behaviour, FakeServer

REPO = Path(__file__).resolve().parents[2]
# CI keeps the shared traces beside the repository: ../shared/traces from the repo root.
SHARED_TRACES = REPO.parent / "shared" / "traces"
MOONCAKE = SHARED_TRACES / "mooncake_conversation_trace.jsonl"
AZURE = SHARED_TRACES / "AzureLLMInferenceTrace_code.csv"


@pytest.fixture
def shared_traces() -> Path:
    if not (MOONCAKE.is_file() and AZURE.is_file()):
        pytest.skip(f"shared traces not found at {SHARED_TRACES}")
    return SHARED_TRACES


@pytest.fixture
def vocab() -> Vocab:
    return Vocab(size=1000, special_ids=frozenset({0, 1, 2, 999}), source="test")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def fake_server():
    """A factory: fake_server(**behaviour) -> a started FakeServer, stopped at teardown."""
    started: list[FakeServer] = []

    def start(**kwargs) -> FakeServer:
        server = FakeServer(Behaviour(**kwargs)).__enter__()
        started.append(server)
        return server

    yield start
    for server in started:
        server.__exit__(None, None, None)

