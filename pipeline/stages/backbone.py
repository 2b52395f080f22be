"""Stage `backbone`: make the frozen model available. For `model.source=tiny` pretrain the offline tiny
GPT-NeoX (cached; minutes on CPU); for a hub model or a local directory, load it once to check it matches
the config and record its fingerprint."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from pipeline.models.backbone import (
    BACKBONE_RECORD,
    LOCAL_MODEL_DIR,
    BackboneError,
    backbone_fingerprint,
    is_local_source,
    load_backbone,
    local_model_fingerprint,
    num_layers_of,
    require_loadable,
    source_revision,
    unembedding_of,
)
from pipeline.orchestration.results import row
from pipeline.stages.base import Stage, StageContext, StageOutput

log = logging.getLogger(__name__)


# Digests of local model files, kept between runs so a large checkpoint is hashed once per version.
FILE_HASHES = "file_hashes.json"


def key_facts(cfg: DictConfig) -> dict:
    """The backbone has no group of its own: its output is defined by these facts of the model group (and,
    for the tiny model, the corpus it pretrains on); not by head_layers or dtype, which only later stages use.
    A hub model is its id and pinned revision; a local directory is its content (weights, config and
    tokenizer files), so re-saving different weights into it recomputes the backbone and everything after."""
    model = cfg.model
    key = {"source": model.source, "revision": source_revision(str(model.source), model.revision)}
    if is_local_source(str(model.source)):
        key["content"] = local_model_fingerprint(model.source, Path(cfg.paths.cache) / FILE_HASHES)
    if model.source == "tiny":
        from pipeline.data.tokens import make_text_source

        key["tiny"] = model.tiny
        key["corpus"] = make_text_source(cfg.data).fingerprint
    return key


def check_loadable(cfg: DictConfig) -> None:
    """A hub model that is neither cached nor reachable fails here, before any other stage starts."""
    if cfg.model.source != "tiny":
        require_loadable(str(cfg.model.source), cfg.model.revision)


def run(ctx: StageContext) -> StageOutput:
    model_cfg = ctx.cfg.model
    rows, metrics = [], {}
    if model_cfg.source == "tiny":
        from pipeline.data.tokens import make_text_source
        from pipeline.models.tiny_pretraining import pretrain_tiny_model

        metrics = pretrain_tiny_model(
            model_cfg.tiny,
            make_text_source(ctx.cfg.data),
            ctx.out_dir / LOCAL_MODEL_DIR,
            progress=ctx.progress,
        )
        model, _ = load_backbone(ctx.out_dir / LOCAL_MODEL_DIR, with_tokenizer=False)
        record = {"local": True, "source": "tiny", "revision": None}
        rows += [
            row(name, value, setting="pretrain")
            for name, value in metrics.items()
            if isinstance(value, int | float) and name != "n_params"
        ]
    else:
        model, _ = load_backbone(
            model_cfg.source, revision=model_cfg.revision, dtype=model_cfg.dtype, with_tokenizer=True
        )
        record = {
            "local": False,
            "source": str(model_cfg.source),
            "revision": source_revision(str(model_cfg.source), model_cfg.revision),
        }
    n_layers, d_model = num_layers_of(model), unembedding_of(model).in_features
    if (n_layers, d_model) != (int(model_cfg.num_layers), int(model_cfg.d_model)):
        raise BackboneError(
            f"{model_cfg.source} has {n_layers} layers and d_model {d_model}, but conf/model/{model_cfg.name}.yaml "
            f"says {model_cfg.num_layers} and {model_cfg.d_model}: fix the model config"
        )
    record.update(
        {
            "name": str(model_cfg.name),
            "fingerprint": backbone_fingerprint(model),
            "num_layers": n_layers,
            "d_model": d_model,
            "vocab_size": unembedding_of(model).out_features,
            "n_params": sum(p.numel() for p in model.parameters()),
        }
    )
    (ctx.out_dir / BACKBONE_RECORD).write_text(json.dumps(record, indent=2))
    rows.append(row("n_params", record["n_params"]))
    ctx.tracker.summary(record)
    return StageOutput(rows=rows, metrics={**metrics, **record})


STAGE = Stage(name="backbone", upstream=(), run=run, key_facts=key_facts, checks=check_loadable)
