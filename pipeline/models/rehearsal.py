"""The Pythia-shaped rehearsal model: a random-weight GPT-NeoX with a Pythia checkpoint's exact architecture
and a tokenizer trained locally, saved as a local model directory.

`python -m pipeline +experiment=pythia_rehearsal` runs every stage on it, on CPU, without the hub: the stages
see the real sizes (70M parameters, a 50,304-wide unembedding, 512-wide hidden states), so shapes, memory and
disk behave as in a real Pythia run, at budgets small enough for minutes on 2 cores. The numbers it produces
say nothing about early exit (the weights are random); the run says that every stage works at that shape.

The experiment points `model.source` at the directory and sets `rehearsal` (this module's settings);
`python -m pipeline` builds the directory before the first stage, once: a finished directory is reused, and a
rebuild from the same settings writes the same files (seeded weights, deterministic tokenizer), so the
backbone's content fingerprint, and with it every cached stage, stays valid.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from pipeline.data.tokens import TextSource
from pipeline.models.pythia_shapes import PYTHIA_SHAPES, pythia_config
from pipeline.models.tiny_model import train_tokenizer
from pipeline.models.tiny_pretraining import capped
from pipeline.orchestration.validation import ConfigError

log = logging.getLogger(__name__)

# Written last into a finished rehearsal directory: what it was built from.
RECORD = "rehearsal.json"
# Settings of the `rehearsal` config section, with their defaults.
DEFAULTS: dict[str, Any] = {
    "shape": "pythia-70m",  # a key of pipeline/models/pythia_shapes.PYTHIA_SHAPES
    "seed": 0,  # the random weights
    "vocab_size": 8192,  # tokens the local BPE learns; the model keeps Pythia's 50,304-row embedding
    "tokenizer_min_frequency": 2,
    "tokenizer_max_bytes": 4_000_000,  # text the tokenizer trains on (seconds, not minutes)
}


def rehearsal_settings(section: Mapping[str, Any]) -> dict[str, Any]:
    """The `rehearsal` section over the defaults; unknown keys and unknown shapes are config errors."""
    unknown = set(section) - set(DEFAULTS)
    if unknown:
        raise ConfigError(f"unknown rehearsal key(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    settings = {**DEFAULTS, **dict(section)}
    if settings["shape"] not in PYTHIA_SHAPES:
        raise ConfigError(
            f"rehearsal.shape={settings['shape']!r} is not a Pythia size; choose one of {sorted(PYTHIA_SHAPES)}"
        )
    if int(settings["vocab_size"]) > pythia_config(settings["shape"]).vocab_size:
        raise ConfigError(
            f"rehearsal.vocab_size={settings['vocab_size']} exceeds the model's embedding rows "
            f"({pythia_config(settings['shape']).vocab_size}); lower it"
        )
    return settings


def build_rehearsal_model(settings: Mapping[str, Any], source: TextSource, out_dir: Path) -> Path:
    """Train the tokenizer on `source`'s train split, build the random-weight model and `save_pretrained`
    both into `out_dir`, written into a sibling first and renamed into place, so an interrupted build never
    leaves a directory that looks finished."""
    from transformers import GPTNeoXForCausalLM

    settings = rehearsal_settings(settings)
    out_dir = Path(out_dir)
    work = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    tokenizer = train_tokenizer(
        capped(source.documents("train"), int(settings["tokenizer_max_bytes"])),
        vocab_size=int(settings["vocab_size"]),
        min_frequency=int(settings["tokenizer_min_frequency"]),
    )
    eos = tokenizer.eos_token_id
    config = pythia_config(settings["shape"], bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(int(settings["seed"]))
    model = GPTNeoXForCausalLM(config).eval()
    model.save_pretrained(work)
    tokenizer.save_pretrained(work)
    record = {
        "settings": settings,
        "corpus_fingerprint": source.fingerprint,
        "n_params": sum(p.numel() for p in model.parameters()),
        "tokenizer_vocab": len(tokenizer),
    }
    (work / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    work.rename(out_dir)
    log.info(
        "rehearsal model %s: random %s (%d parameters), local tokenizer of %d tokens",
        out_dir,
        settings["shape"],
        record["n_params"],
        record["tokenizer_vocab"],
    )
    return out_dir


def ensure_rehearsal_model(cfg) -> Path | None:
    """Build the directory `model.source` names from the config's `rehearsal` section unless a finished one
    built from the same settings and corpus is there; None when the config has no `rehearsal` section."""
    from omegaconf import OmegaConf

    from pipeline.data.tokens import make_text_source

    section = cfg.get("rehearsal")
    if not section:
        return None
    settings = rehearsal_settings(OmegaConf.to_container(section, resolve=True))
    source = make_text_source(cfg.data)
    out_dir = Path(str(cfg.model.source))
    record_path = out_dir / RECORD
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("settings") == settings and record.get("corpus_fingerprint") == source.fingerprint:
            return out_dir
    log.info("building the rehearsal model in %s", out_dir)
    return build_rehearsal_model(settings, source, out_dir)
