"""The early-exit lm-eval model against lm-eval's own HFLM, on a tiny random GPT-NeoX and the offline tasks."""

from __future__ import annotations

import math

import lm_eval
import pytest
import torch
from lm_eval.models.huggingface import HFLM

from pipeline.evaluation.lm_eval_adapter import EarlyExitLM
from pipeline.evaluation.offline_tasks import TASKS, OfflineTaskSettings, task_manager, write_offline_tasks
from pipeline.exits.heads import EarlyExitHeads
from pipeline.exits.policy import ExitPolicy
from pipeline.models.tiny_model import train_tokenizer
from tests.conftest import tiny_gpt_neox

HEAD_LAYERS = [1, 2]
NUM_LAYERS = 4


def _policy(thresholds) -> ExitPolicy:
    return ExitPolicy(HEAD_LAYERS, thresholds, "entropy")


def synthetic_documents(n_docs: int = 12) -> list[str]:
    """Small Python-like files: lines that end in a word (next-word task) and lines of 12-80 chars."""
    docs = []
    for d in range(n_docs):
        lines = [f"class Widget{d}:"]
        for i in range(6):
            lines += [
                f"    def method_{d}_{i}(self, value):",
                f"        total = value * {i + d} + self.offset",
                f"        return total if value else self.default_{i}",
            ]
        docs.append("\n".join(lines) + "\n")
    return docs


@pytest.fixture(scope="module")
def tiny():
    docs = synthetic_documents()
    tokenizer = train_tokenizer(iter(docs), vocab_size=320, min_frequency=1)
    model = tiny_gpt_neox(num_layers=NUM_LAYERS, vocab=len(tokenizer))
    # Random projections, so the heads' logits differ clearly from the full model's.
    heads = EarlyExitHeads.from_backbone(model, HEAD_LAYERS, init="random", seed=1)
    return model, tokenizer, heads, docs


@pytest.fixture(scope="module")
def tasks_dir(tiny, tmp_path_factory):
    directory = tmp_path_factory.mktemp("offline_tasks")
    write_offline_tasks(directory, tiny[3], OfflineTaskSettings(n_examples=6, context_lines=2, n_choices=3))
    return directory


def evaluate(lm, tasks_dir, log_samples: bool = False, tasks: list[str] | None = None) -> dict:
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks or list(TASKS),
        task_manager=task_manager(tasks_dir),
        bootstrap_iters=10,
        log_samples=log_samples,
        random_seed=0,
    )


def metrics_of(results: dict) -> dict:
    return {
        task: {k: v for k, v in values.items() if "," in k} for task, values in results["results"].items()
    }


def test_every_head_disabled_equals_hflm_exactly(tiny, tasks_dir):
    model, tokenizer, heads, _ = tiny
    ours = EarlyExitLM(model, tokenizer, heads, batch_size=4, device="cpu")
    reference = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, device="cpu")
    # One task per evaluation, as the adapter does internally: lm-eval's HFLM shares its one-token logits
    # cache across tasks, which can change a task's numbers depending on which other tasks run with it.
    for task in TASKS:
        got = evaluate(ours, tasks_dir, log_samples=True, tasks=[task])
        want = evaluate(reference, tasks_dir, log_samples=True, tasks=[task])
        assert metrics_of(got) == metrics_of(want)
        assert [s["resps"] for s in got["samples"][task]] == [s["resps"] for s in want["samples"][task]]
        # The full model: nothing exits, and it costs L blocks + the unembedding per scored token.
        stats = ours.exit_stats[task]
        assert stats.positions > 0 and stats.per_head == [0, 0]
        assert stats.compute_fraction == pytest.approx(1.0)


def expected_head_loglikelihood(model, tokenizer, heads, head: int, context: str, continuation: str) -> float:
    """Sum of log p_head(continuation | context), computed directly from the model's hidden states."""
    # lm-eval's convention: trailing whitespace of the context is scored as part of the continuation.
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped) :] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    cont = whole[n_context:]
    with torch.no_grad():
        hidden = model(torch.tensor([whole[:-1]]), output_hidden_states=True).hidden_states
        logp = torch.log_softmax(heads(head, hidden[heads.layers[head] + 1][0]), dim=-1)
    scored = logp[-len(cont) :]
    return float(scored[torch.arange(len(cont)), torch.tensor(cont)].sum())


def test_head_forced_to_exit_scores_with_that_heads_logits(tiny, tasks_dir):
    model, tokenizer, heads, _ = tiny
    # Entropy <= +inf always holds: head 0 takes every position, head 1 is never reached.
    lm = EarlyExitLM(model, tokenizer, heads, policy=_policy([math.inf, None]), batch_size=4, device="cpu")
    results = evaluate(lm, tasks_dir, log_samples=True)
    n_checked = 0
    for task in TASKS:
        for sample in results["samples"][task]:
            for (context, continuation), resp in zip(sample["arguments"], sample["resps"], strict=True):
                loglik = resp[0][0]
                want = expected_head_loglikelihood(model, tokenizer, heads, 0, context, continuation)
                assert loglik == pytest.approx(want, rel=1e-5, abs=1e-4)
                n_checked += 1
        stats = lm.exit_stats[task]
        assert stats.exit_fractions == [1.0, 0.0]
        cost = lm.cost
        assert stats.layer_equivalents_per_token == pytest.approx(HEAD_LAYERS[0] + 1 + cost.head)
        assert stats.compute_fraction == pytest.approx(
            (HEAD_LAYERS[0] + 1 + cost.head) / (NUM_LAYERS + cost.head)
        )
    assert n_checked > 12


def test_set_policy_resets_stats_and_checks_length(tiny, tasks_dir):
    model, tokenizer, heads, _ = tiny
    lm = EarlyExitLM(model, tokenizer, heads, batch_size=4, device="cpu")
    evaluate(lm, tasks_dir)
    assert set(lm.exit_stats) == set(TASKS)
    lm.set_policy(_policy([None, 1.0]))
    assert lm.exit_stats == {} and lm.policy.enabled == [1]
    with pytest.raises(ValueError, match="thresholds"):
        lm.set_policy(ExitPolicy(HEAD_LAYERS[:1], [None]))


def generation_requests(docs: list[str], n: int = 4, max_gen_toks: int = 12) -> list:
    from lm_eval.api.instance import Instance

    kwargs = {"until": ["\n\n"], "max_gen_toks": max_gen_toks, "do_sample": False}
    return [
        Instance(
            request_type="generate_until",
            doc={},
            arguments=(doc[: 40 + 7 * i], dict(kwargs)),
            idx=0,
            metadata=("gen", i, 1),
        )
        for i, doc in enumerate(docs[:n])
    ]


def test_generation_dssd_gives_the_full_models_text(tiny):
    model, tokenizer, heads, docs = tiny
    requests = generation_requests(docs)
    reference = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, device="cpu").generate_until(
        requests
    )
    # Permissive thresholds on random heads: drafts are often wrong, so verification is exercised.
    dssd = EarlyExitLM(
        model,
        tokenizer,
        heads,
        policy=_policy([math.inf, 5.0]),
        generation="dssd",
        max_draft=4,
        batch_size=1,
        device="cpu",
    )
    assert dssd.generate_until(requests) == reference
    full = EarlyExitLM(model, tokenizer, heads, batch_size=1, device="cpu")
    assert full.generate_until(requests) == reference
    assert full.exit_stats["gen"].compute_fraction == pytest.approx(1.0)


def test_generation_early_exit_records_exits(tiny):
    model, tokenizer, heads, docs = tiny
    lm = EarlyExitLM(model, tokenizer, heads, policy=_policy([math.inf, None]), batch_size=1, device="cpu")
    texts = lm.generate_until(generation_requests(docs, n=2, max_gen_toks=8))
    assert len(texts) == 2
    stats = lm.exit_stats["gen"]
    # Every token after the first (which the prompt's full forward produces) exits at head 0.
    assert stats.per_head[0] == stats.positions - 2 and stats.per_head[1] == 0
    assert stats.compute_fraction < 1.0


def stage_config(**early_exit):
    from omegaconf import OmegaConf

    from pipeline.config import typed_group

    cfg = OmegaConf.create(
        {
            "model": OmegaConf.load("conf/model/tiny.yaml"),
            "data": OmegaConf.load("conf/data/local_text.yaml"),
            "early_exit": typed_group("early_exit", {}),
            "calibrate": typed_group("calibrate", {}),
            "seed": 0,
        }
    )
    for key, value in early_exit.items():
        OmegaConf.update(cfg, f"early_exit.{key}", value, merge=isinstance(value, dict))
    return cfg


def test_stage_validate_rejects_bad_eps_and_methods():
    from pipeline.orchestration.validation import ConfigError
    from pipeline.stages.early_exit import STAGE

    STAGE.validate(stage_config())
    with pytest.raises(ConfigError, match="outside"):
        STAGE.validate(stage_config(eps=[1.5]))
    with pytest.raises(ConfigError, match="not calibrated"):
        STAGE.validate(stage_config(eps=[0.77]))
    with pytest.raises(ConfigError, match="not calibrated"):
        STAGE.validate(stage_config(methods=["bogus"]))


def test_stage_writes_accuracy_compute_and_token_rows(tiny, tmp_path):
    import json

    from pipeline.exits.thresholds import ExitThresholds, eps_key
    from pipeline.orchestration.tracking import Tracker
    from pipeline.stages.base import StageContext
    from pipeline.stages.early_exit import run

    model, tokenizer, heads, _ = tiny
    backbone = tmp_path / "backbone"
    model.save_pretrained(backbone / "model")
    tokenizer.save_pretrained(backbone / "model")
    (backbone / "backbone.json").write_text(json.dumps({"local": True}))
    heads.save(tmp_path / "heads")
    cfg = stage_config(
        eps=[0.9],
        offline={"n_examples": 4, "context_lines": 2, "split": "test", "n_choices": 3, "seed": 0},
        token_eval={"n_tokens": 128, "fills": ["lazy", "copy"], "batch_size": 1},
    )
    cfg.data.seq_len = 64
    # Head 0 always exits at ε=0.9 (empirical); the other ε are irrelevant here.
    table = {
        m: {eps_key(e): [1e9 if e == 0.9 else None, None] for e in cfg.calibrate.eps} for m in ("empirical",)
    }
    ExitThresholds(
        metric="entropy",
        lower_is_confident=True,
        layers=HEAD_LAYERS,
        eps=list(cfg.calibrate.eps),
        delta=0.05,
        cascade=True,
        thresholds=table,
    ).save(tmp_path / "calibrate" / "thresholds.json")

    class NoTracker(Tracker):
        def __init__(self) -> None:
            pass

        def log_table(self, name, frame) -> None:
            pass

    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext(
        cfg=cfg,
        out_dir=out,
        inputs={
            "backbone": backbone,
            "heads": tmp_path / "heads",
            "calibrate": tmp_path / "calibrate",
            "extract": tmp_path,
        },
        device=torch.device("cpu"),
        tracker=NoTracker(),
        progress=False,
    )
    output = run(ctx)
    # Keyed by the policy: the full model, a calibration method, or a KV fill for token-level rows.
    rows = {
        (r["fill"] or r["calibration"] or r["setting"], r["eps"], r["head"], r["metric"]): r["value"]
        for r in output.rows
    }
    for task in TASKS:
        assert ("full", None, None, f"acc/{task}") in rows and (
            "full",
            None,
            None,
            f"acc_stderr/{task}",
        ) in rows
        assert rows[("full", None, None, f"compute_frac/{task}")] == pytest.approx(1.0)
        assert rows[("empirical", 0.9, 0, f"exit_frac/{task}")] == 1.0
        assert rows[("empirical", 0.9, None, f"compute_frac/{task}")] < 1.0
    assert rows[("lazy", 0.9, 0, "exit_frac")] == 1.0 and ("copy", 0.9, None, "agreement") in rows
    assert ("full", None, None, "ppl") in rows
    acc = output.tables["accuracy_compute"]
    assert list(acc["policy"]) == ["full", "full", "empirical", "empirical"]
    assert (out / "offline_tasks" / "offline_next_line.jsonl").is_file()


@pytest.mark.parametrize("progress", [True, False])
def test_progress_false_keeps_lm_evals_request_bars_off(tiny, tasks_dir, capfd, progress):
    model, tokenizer, heads, _ = tiny
    lm = EarlyExitLM(model, tokenizer, heads, batch_size=4, device="cpu", progress=progress)
    capfd.readouterr()
    evaluate(lm, tasks_dir, tasks=[TASKS[0]])
    bars = "Running loglikelihood requests" in capfd.readouterr().err
    assert bars == progress
