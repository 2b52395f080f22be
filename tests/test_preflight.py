"""Split preflight (issue 15): every split's token budget is settled before any work, for every data source.

Reproduces the defect first: `data.budgets.validation=200000` on local_text used to extract the whole train
split and then fail with a ValueError traceback. MiniPile cannot be downloaded here, so its path runs for real
against a local copy laid out like the hub repository (README.md with the dataset card's `dataset_info`,
data/<split>-*.parquet), read through the same `datasets` calls."""

from __future__ import annotations

import time

import pytest

from pipeline.data.corpus import LocalTextCorpus
from pipeline.data.preflight import MAX_BYTES_PER_TOKEN, check_budgets
from pipeline.data.tokens import BudgetError, MiniPileSource, count_tokens, iter_token_ids
from pipeline.models.tiny_model import train_tokenizer
from pipeline.orchestration.store import SUCCESS_FILE
from pipeline.orchestration.validation import ConfigError

from .micro import compose_micro, run_micro

# JeanKaddour/minipile's dataset card (README.md `dataset_info`): bytes and documents per split.
MINIPILE_SPLITS = {
    "train": (5_906_108_510, 1_000_000),
    "validation": (2_779_386, 500),
    "test": (58_558_191, 10_000),
}

TRAIN_TEXT = [f"def f{i}(x):\n    return x * {i} + {i * 7}\n\n" * 4 for i in range(60)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(iter(TRAIN_TEXT), vocab_size=300, model_max_length=512)


@pytest.fixture
def corpus(tmp_path):
    for i in range(40):
        (tmp_path / f"mod{i:02d}.py").write_text(f"# module {i}\n" + TRAIN_TEXT[i % 60] * (1 + i % 3))
    return LocalTextCorpus(root=tmp_path, split_fractions={"train": 0.8, "validation": 0.1, "test": 0.1})


def _never():
    raise AssertionError("the tokenizer was loaded although the size bounds settled every split")


def test_budget_above_the_bytes_fails_without_a_tokenizer(corpus):
    n_bytes = corpus.split_size("validation").n_bytes
    with pytest.raises(BudgetError) as err:
        check_budgets(corpus, {"train": 64, "validation": 4 * n_bytes}, seq_len=16, load_tokenizer=_never)
    message = str(err.value)
    assert isinstance(err.value, ConfigError)
    assert f"data.budgets.validation={4 * n_bytes:,}" in message
    assert "cannot come from the validation split of local_text" in message
    assert f"{n_bytes:,} bytes" in message and "a token is at least one byte" in message
    assert (
        "lower data.budgets.validation to at most" in message and "data.split_fractions.validation" in message
    )


def test_budget_between_the_bounds_is_counted_exactly(corpus, tokenizer):
    exact = count_tokens(corpus, tokenizer, "validation")
    assert exact == sum(len(ids) for ids in iter_token_ids(corpus, tokenizer, "validation"))
    assert corpus.split_size("validation").n_bytes / MAX_BYTES_PER_TOKEN < exact  # not settled by a bound
    fits = exact // 16 * 16
    checks = check_budgets(corpus, {"validation": fits}, seq_len=16, tokenizer=tokenizer)
    assert [c.verdict for c in checks] == ["counted"]
    with pytest.raises(BudgetError) as err:
        check_budgets(corpus, {"validation": fits + 16}, seq_len=16, tokenizer=tokenizer)
    message = str(err.value)
    assert f"only {exact:,} tokens (counted with the model's tokenizer)" in message
    assert f"at most {fits:,} ({fits // 16} blocks of data.seq_len=16)" in message


def test_small_budgets_fit_by_the_bound_and_unknown_ones_are_deferred(corpus):
    checks = check_budgets(corpus, {"train": 16, "test": 0}, seq_len=16, load_tokenizer=_never)
    assert [(c.split, c.verdict) for c in checks] == [("train", "fits")]
    n_bytes = corpus.split_size("test").n_bytes
    deferred = check_budgets(corpus, {"test": n_bytes // 2}, seq_len=16, load_tokenizer=lambda: None)
    assert deferred[0].verdict == "deferred" and "extraction checks it" in deferred[0].evidence


# --- MiniPile through a local copy ----------------------------------------------------------------------


def _minipile_copy(root, docs: dict[str, list[str]], card: dict[str, tuple[int, int]] | None = None):
    """A directory laid out like JeanKaddour/minipile: the card's split sizes (`card`, default: the real data's
    own) in README.md, one parquet file per split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "data").mkdir(parents=True)
    sizes = card or {s: (sum(len(t.encode()) for t in texts), len(texts)) for s, texts in docs.items()}
    lines = ["---", "dataset_info:", "  features:", "  - name: text", "    dtype: string", "  splits:"]
    for split, (n_bytes, n_docs) in sizes.items():
        lines += [f"  - name: {split}", f"    num_bytes: {n_bytes}", f"    num_examples: {n_docs}"]
    (root / "README.md").write_text("\n".join([*lines, "---", ""]))
    for split, texts in docs.items():
        pq.write_table(pa.table({"text": texts}), root / "data" / f"{split}-00000-of-00001.parquet")
    return MiniPileSource(hub_id=str(root))


def test_minipile_split_sizes_come_from_the_dataset_card(tmp_path):
    docs = {
        s: [f"{s} document {i}. " * 10 for i in range(n)]
        for s, n in (("train", 5), ("validation", 2), ("test", 3))
    }
    source = _minipile_copy(tmp_path / "minipile", docs, card=MINIPILE_SPLITS)
    size = source.split_size("validation")
    assert (size.n_bytes, size.n_documents, size.origin) == (2_779_386, 500, "the dataset's metadata")
    assert list(source.documents("test")) == docs["test"]
    # The full sweep's old validation budget (1M tokens) is above what the card allows: fails at once.
    with pytest.raises(BudgetError, match=r"validation split of minipile: it holds at most 2,779,886 tokens"):
        check_budgets(
            source, {"train": 16_000_000, "validation": 3_000_000}, seq_len=512, load_tokenizer=_never
        )
    checks = check_budgets(
        source, {"train": 16_000_000, "test": 1_000_000}, seq_len=512, load_tokenizer=_never
    )
    assert [c.verdict for c in checks] == ["fits", "fits"]


def test_minipile_budget_between_the_bounds_is_counted_by_streaming(tmp_path, tokenizer):
    docs = {s: [TRAIN_TEXT[i] for i in range(n)] for s, n in (("train", 40), ("validation", 4), ("test", 4))}
    source = _minipile_copy(tmp_path / "minipile", docs)
    exact = count_tokens(source, tokenizer, "validation")
    with pytest.raises(BudgetError) as err:
        check_budgets(source, {"validation": exact + 64}, seq_len=16, tokenizer=tokenizer)
    assert f"only {exact:,} tokens" in str(err.value) and "MiniPile's splits are fixed" in str(err.value)


# --- the reproduced defect: a real run on the micro pipeline --------------------------------------------


def test_impossible_validation_budget_fails_before_any_extraction(micro_copy):
    """With the tiny backbone finished, `data.budgets.validation=200000` (the split holds ~180k tokens) fails
    in the preflight: a one-line ConfigError, exit code 2, nothing extracted."""
    from pipeline.orchestration.runner import Runner

    cfg = compose_micro(micro_copy, "data.budgets.validation=200000")
    runner = Runner(cfg)
    started = time.time()
    with pytest.raises(
        BudgetError, match="data.budgets.validation=200,000 tokens cannot come from the validation"
    ):
        runner.validate()
    assert time.time() - started < 60
    extract_entry = runner.store.entry("extract", "tiny", runner.keys["extract"])
    assert (
        not extract_entry.exists() and not extract_entry.with_name(extract_entry.name + ".partial").exists()
    )

    result = run_micro(micro_copy, "data.budgets.validation=200000")
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output and "BudgetError: data.budgets.validation=200,000" in output
    assert "counted with the model's tokenizer" in output
    assert not list((micro_copy / "cache" / "extract").rglob(f"*/{runner.keys['extract']}*/{SUCCESS_FILE}"))


def test_budget_the_preflight_could_not_count_fails_before_the_first_shard(micro_copy, monkeypatch):
    """The tiny model's tokenizer exists only after pretraining, so a cold run's preflight defers the count;
    extraction then tokenizes every split before writing its first shard."""
    import pipeline.stages.extract as extract
    from pipeline.orchestration.runner import Runner

    monkeypatch.setattr(extract, "preflight_tokenizer", lambda cfg: None)  # as before pretraining
    runner = Runner(compose_micro(micro_copy, "data.budgets.validation=200000"))
    with pytest.raises(BudgetError, match=r"validation split of local_text: it holds only [0-9,]+ tokens"):
        runner.run()
    assert runner.status["backbone"] == "reused"
    assert not list((micro_copy / "cache" / "extract").rglob(f"{runner.keys['extract']}*/**/*.npy"))


def test_a_finished_extraction_is_not_preflighted_again(micro_copy, monkeypatch):
    """Its key holds the budgets, so a rerun of later stages reads no corpus (MiniPile: no network)."""
    import pipeline.data.preflight as preflight
    from pipeline.orchestration.runner import Runner

    class PreflightRan(Exception):
        pass

    def check_budgets(*args, **kwargs):
        raise PreflightRan

    monkeypatch.setattr(preflight, "check_budgets", check_budgets)
    Runner(compose_micro(micro_copy)).validate()
    with pytest.raises(PreflightRan):  # a changed budget is a new extraction: checked
        Runner(compose_micro(micro_copy, "data.budgets.test=2048")).validate()
