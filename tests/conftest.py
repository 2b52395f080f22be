"""Shared fixtures: tiny random models built locally (no hub), and an isolated outputs root."""

from __future__ import annotations

import os
import shutil

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle threads sleep instead of spinning

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def outputs_root(tmp_path, monkeypatch):
    root = tmp_path / "outputs"
    monkeypatch.setenv("PIPELINE_OUTPUTS", str(root))
    return root


class ListSource:
    """A `TextSource` over in-memory documents per split, for exact token accounting in tests."""

    name = "list"

    def __init__(self, docs: dict[str, list[str]], fingerprint: str = "list") -> None:
        self.docs = docs
        self.fingerprint = fingerprint

    def documents(self, split: str):
        yield from self.docs[split]


def tiny_gpt_neox(num_layers: int = 4, d_model: int = 32, vocab: int = 128, seed: int = 0):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=d_model,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        intermediate_size=4 * d_model,
        max_position_embeddings=256,
        rotary_pct=0.25,
        use_parallel_residual=True,
        tie_word_embeddings=False,
    )
    return GPTNeoXForCausalLM(config).eval()


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory):
    """One full micro pipeline run; tests that modify outputs work on a copy (`micro_copy`)."""
    from pipeline.orchestration.runner import Runner

    from .micro import compose_micro

    root = tmp_path_factory.mktemp("micro") / "outputs"
    runner = Runner(compose_micro(root))
    results = runner.run(root / "run")
    return root, runner, results


@pytest.fixture
def micro_copy(micro_run, tmp_path):
    root, _, _ = micro_run
    copy = tmp_path / "outputs"
    shutil.copytree(root / "cache", copy / "cache")
    return copy


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tiny models (OpenMP threads spinning against other processes on a
    2-core machine make every op 10-100x slower), restored after the module so later tests — and the
    session's micro run, which must match its own subprocess reruns bit for bit — keep the session's count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Some tests pin one thread; results are bitwise-reproducible only for a fixed thread count, so every
    test (and the session's micro run) starts from the same count."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# Tests that run the micro pipeline (in process or as `python -m pipeline` subprocesses) are `integration`;
# everything else is a `unit` test: `python -m pytest -m unit` (about 6 minutes on 2 cores, the engine's losslessness
# matrix being most of it).
INTEGRATION_FIXTURES = {"micro_run", "micro_copy"}
INTEGRATION_MODULES = {"test_pipeline_e2e", "test_reliability", "test_sweep", "test_refactor_equality"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("slow"):
            continue  # `slow` is its own selection (excluded by default)
        module = item.module.__name__.rsplit(".", 1)[-1]
        integration = module in INTEGRATION_MODULES or INTEGRATION_FIXTURES & set(item.fixturenames)
        item.add_marker(pytest.mark.integration if integration else pytest.mark.unit)
