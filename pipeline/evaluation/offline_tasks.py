"""Benchmarks the project builds itself from the held-out split of the local corpus, as lm-eval task YAMLs over
local JSONL files, so the early-exit stage needs no network (lm-eval's own tasks download their datasets).

Two tasks, deterministic given the corpus, the split and a seed:

- `offline_next_word` (loglikelihood; acc = the target is the greedy continuation, plus perplexity): LAMBADA
  style. Context = up to `context_lines` preceding lines and the current line up to its last word; target =
  " " + that word (an identifier of at least `min_word_chars` characters).
- `offline_next_line` (multiple choice; acc, acc_norm): context = up to `context_lines` preceding lines; choices =
  the true next line and `n_choices - 1` distractor lines drawn from the same split. Distractors take the true
  line's indentation, so the choice is about content, not indentation (which would give the answer away).

`write_offline_tasks` writes `<task>.jsonl` + `<task>.yaml` into a directory; `task_manager(directory)` loads them
with lm-eval's `TaskManager(include_path=...)`. The YAMLs name their JSONL by absolute path (lm-eval resolves
`data_files` against the working directory, not the YAML), so a moved directory must be written again; that is
cheap and gives the same examples.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

NEXT_WORD = "offline_next_word"
NEXT_LINE = "offline_next_line"
TASKS = (NEXT_WORD, NEXT_LINE)

# The identifier a line ends with: the code analogue of LAMBADA's last word (`self.offset` ends in `offset`).
_LAST_WORD = re.compile(r"(?<![A-Za-z0-9_])[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class OfflineTaskSettings:
    split: str = "test"
    n_examples: int = 500  # per task
    n_choices: int = 4  # next-line task: true line + distractors
    context_lines: int = 8
    min_line_chars: int = 12  # candidate lines (stripped) for the next-line task
    max_line_chars: int = 80
    min_word_chars: int = 3
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> OfflineTaskSettings:
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in dict(cfg or {}).items() if k in known}
        return cls(**values)


def _context(lines: list[str], index: int, n: int) -> str:
    return "".join(line + "\n" for line in lines[max(0, index - n) : index])


def next_word_examples(documents: Iterable[str], settings: OfflineTaskSettings) -> list[dict[str, Any]]:
    """LAMBADA-style examples: {"context", "target"}; `context + target` is the original text.

    A space before the word goes with the target (BPE tokenizers attach it to the word, as LAMBADA's " word");
    any other separator (`.`, `(`) stays in the context.
    """
    candidates = []
    for doc in documents:
        lines = doc.splitlines()
        for i, line in enumerate(lines):
            match = _LAST_WORD.search(line)
            if not match or len(match[0]) < settings.min_word_chars:
                continue
            start = match.start() - 1 if line[: match.start()].endswith(" ") else match.start()
            if not line[:start].strip():
                continue  # the word opens its line: nothing on the line to complete
            candidates.append(
                {"context": _context(lines, i, settings.context_lines) + line[:start], "target": line[start:]}
            )
    rng = random.Random(f"{settings.seed}/{NEXT_WORD}")
    return rng.sample(candidates, min(settings.n_examples, len(candidates)))


def next_line_examples(documents: Iterable[str], settings: OfflineTaskSettings) -> list[dict[str, Any]]:
    """Multiple-choice examples: {"context", "choices", "label"}; `context + choices[label]` is the text."""
    positions = []
    for doc in documents:
        lines = doc.splitlines()
        for i, line in enumerate(lines):
            body = line.strip()
            # A line that repeats one of the context lines can be copied rather than predicted; skip it.
            if (
                i > 0
                and settings.min_line_chars <= len(body) <= settings.max_line_chars
                and line not in lines[max(0, i - settings.context_lines) : i]
            ):
                positions.append((lines, i))
    pool = sorted({lines[i].strip() for lines, i in positions})
    if len(pool) < settings.n_choices:
        raise ValueError(
            f"only {len(pool)} distinct candidate lines in split {settings.split!r}; "
            f"need at least n_choices={settings.n_choices}"
        )
    rng = random.Random(f"{settings.seed}/{NEXT_LINE}")
    chosen = rng.sample(positions, min(settings.n_examples, len(positions)))
    examples = []
    for lines, i in chosen:
        line = lines[i]
        indent = line[: len(line) - len(line.lstrip())]
        distractors: list[str] = []
        while len(distractors) < settings.n_choices - 1:
            candidate = rng.choice(pool)
            if candidate != line.strip() and candidate not in distractors:
                distractors.append(candidate)
        choices = [line] + [indent + d for d in distractors]
        order = list(range(len(choices)))
        rng.shuffle(order)
        examples.append(
            {
                "context": _context(lines, i, settings.context_lines),
                "choices": [choices[j] for j in order],
                "label": order.index(0),
            }
        )
    return examples


def _task_yaml(name: str, data_file: Path) -> dict[str, Any]:
    common = {
        "task": name,
        "tag": ["offline"],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
        "test_split": "test",
        # Column names, not Jinja templates: the text is source code, full of braces and significant whitespace.
        "doc_to_text": "context",
        # The continuation carries its own leading space / indentation; lm-eval's default " " would add one.
        "target_delimiter": "",
        "metadata": {"version": 1.0},
    }
    if name == NEXT_WORD:
        return {
            **common,
            "output_type": "loglikelihood",
            "doc_to_target": "target",
            "metric_list": [
                {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            ],
        }
    return {
        **common,
        "output_type": "multiple_choice",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
    }


def write_offline_tasks(
    directory: str | Path, documents: Iterable[str] | Any, settings: OfflineTaskSettings | None = None
) -> dict[str, int]:
    """Write both tasks into `directory`; return the number of examples per task.

    `documents` is an iterable of held-out documents, or a `pipeline.data.tokens.TextSource` (its `settings.split`).
    """
    settings = settings or OfflineTaskSettings()
    if hasattr(documents, "documents"):
        documents = documents.documents(settings.split)
    docs = list(documents)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, build in ((NEXT_WORD, next_word_examples), (NEXT_LINE, next_line_examples)):
        examples = build(docs, settings)
        if not examples:
            raise ValueError(
                f"no examples for {name} in split {settings.split!r}: the split is empty or too small"
            )
        data_file = directory / f"{name}.jsonl"
        data_file.write_text("".join(json.dumps(example) + "\n" for example in examples))
        (directory / f"{name}.yaml").write_text(yaml.safe_dump(_task_yaml(name, data_file), sort_keys=False))
        counts[name] = len(examples)
    return counts


def task_manager(directory: str | Path | None = None, include_defaults: bool = False):
    """lm-eval's TaskManager over the offline tasks in `directory` (and lm-eval's own tasks if asked)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(
        include_path=str(directory) if directory is not None else None, include_defaults=include_defaults
    )
