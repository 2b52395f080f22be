"""The project-built lm-eval tasks: deterministic examples, faithful to the text, loaded with no network."""

from __future__ import annotations

import json
import socket

import pytest

from pipeline.evaluation.offline_tasks import (
    NEXT_LINE,
    NEXT_WORD,
    TASKS,
    OfflineTaskSettings,
    next_line_examples,
    next_word_examples,
    task_manager,
    write_offline_tasks,
)
from tests.conftest import ListSource
from tests.test_lm_eval_adapter import synthetic_documents

SETTINGS = OfflineTaskSettings(n_examples=10, n_choices=4, context_lines=3)


def test_examples_are_deterministic_given_the_seed():
    docs = synthetic_documents()
    assert next_word_examples(docs, SETTINGS) == next_word_examples(docs, SETTINGS)
    assert next_line_examples(docs, SETTINGS) == next_line_examples(docs, SETTINGS)
    other = OfflineTaskSettings(n_examples=10, n_choices=4, context_lines=3, seed=1)
    assert next_line_examples(docs, other) != next_line_examples(docs, SETTINGS)


def test_next_word_examples_complete_the_original_text():
    docs = synthetic_documents()
    examples = next_word_examples(docs, SETTINGS)
    assert len(examples) == SETTINGS.n_examples
    for ex in examples:
        assert any(ex["context"] + ex["target"] + "\n" in doc for doc in docs)
        word = ex["target"].lstrip(" ")
        assert word.isidentifier() and len(word) >= SETTINGS.min_word_chars
        assert ex["context"].strip()


def test_next_line_examples_have_one_true_line_and_aligned_distractors():
    docs = synthetic_documents()
    for ex in next_line_examples(docs, SETTINGS):
        choices, label = ex["choices"], ex["label"]
        assert len(choices) == SETTINGS.n_choices and len(set(choices)) == SETTINGS.n_choices
        assert 0 <= label < len(choices)
        assert any(ex["context"] + choices[label] + "\n" in doc for doc in docs)
        # Same indentation for every choice: indentation alone never reveals the answer.
        indents = {c[: len(c) - len(c.lstrip())] for c in choices}
        assert len(indents) == 1


def test_too_few_lines_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no examples"):
        write_offline_tasks(tmp_path, ["x\n"], SETTINGS)


def test_tasks_load_from_local_files_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("the offline tasks tried to open a network connection")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    source = ListSource({"test": synthetic_documents()})
    counts = write_offline_tasks(tmp_path, source, SETTINGS)
    assert counts == {NEXT_WORD: SETTINGS.n_examples, NEXT_LINE: SETTINGS.n_examples}

    from lm_eval.tasks import get_task_dict

    tasks = get_task_dict(list(TASKS), task_manager(tmp_path))
    assert set(tasks) == set(TASKS)
    for name, task in tasks.items():
        docs = list(task.test_docs())
        on_disk = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        assert len(docs) == len(on_disk) == SETTINGS.n_examples
        assert task.doc_to_text(docs[0]) == on_disk[0]["context"]
    line_task = tasks[NEXT_LINE]
    doc = next(iter(line_task.test_docs()))
    assert line_task.doc_to_choice(doc) == doc["choices"] and line_task.doc_to_target(doc) == doc["label"]
    assert line_task.OUTPUT_TYPE == "multiple_choice" and tasks[NEXT_WORD].OUTPUT_TYPE == "loglikelihood"
