"""Stage `extract`: run the frozen backbone over each split's token budget and store, per token, the residual
stream after every head layer and the final post-norm hidden state (fp16 shards, docs/design.md §3)."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from pipeline.data.shards import ShardWriter
from pipeline.models.backbone import LOCAL_MODEL_DIR, decoder_of, load_from_stage_output
from pipeline.orchestration.results import row
from pipeline.orchestration.validation import ConfigError
from pipeline.stages.base import Stage, StageContext, StageOutput

log = logging.getLogger(__name__)
META_FILE = "meta.json"
SPLITS = ("train", "validation", "test")


class DiskSpaceError(ConfigError):
    """Not enough free disk for the extraction estimate."""


def key_facts(cfg: DictConfig) -> dict:
    """Beyond the `extract` group (whose settings are all volatile): the model and data facts that define the
    stored hidden states."""
    from pipeline.data.tokens import make_text_source

    data = cfg.data
    return {
        "dtype": cfg.model.dtype,
        "head_layers": list(cfg.model.head_layers),
        "data": {
            "kind": data.kind,
            "seq_len": data.seq_len,
            "budgets": dict(data.budgets),
            "split_fractions": data.get("split_fractions"),
            "split_seed": data.get("split_seed"),
            "fingerprint": make_text_source(data).fingerprint,
        },
    }


def bytes_needed(cfg: DictConfig) -> int:
    n_slots = len(cfg.model.head_layers) + 1
    per_token = n_slots * int(cfg.model.d_model) * 2 + 4
    return per_token * sum(int(b) for b in cfg.data.budgets.values())


def check_disk(cfg: DictConfig, directory: Path) -> None:
    need = bytes_needed(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if need * 1.05 > free:
        raise DiskSpaceError(
            f"extraction needs about {need / 2**30:.2f} GiB but only {free / 2**30:.2f} GiB is free under "
            f"{directory}; lower data.budgets or point paths.root (PIPELINE_OUTPUTS) at a larger disk"
        )


@torch.inference_mode()
def extract_split(
    model,
    blocks: torch.Tensor,
    layers: list[int],
    writer: ShardWriter,
    batch_size: int,
    device: torch.device,
    progress: bool,
    desc: str,
) -> int:
    """Forward `blocks` [n, seq_len] in batches; write head-layer residuals + final hidden per token.

    Only the decoder runs (`model.gpt_neox` / `model.model`): the LM head's logits would be thrown away. At
    the Pythia-70m shape on 2 CPU cores the base model runs 1.4–1.7x the tokens/s of the full causal LM
    (benchmarks/extraction_speed.py). The states are the full model's `output_hidden_states`, bit for bit."""
    decoder = decoder_of(model)
    n_tokens = 0
    for start in tqdm(range(0, len(blocks), batch_size), desc=desc, disable=not progress, unit="batch"):
        batch = blocks[start : start + batch_size].to(device)
        hidden_states = decoder(input_ids=batch, output_hidden_states=True, use_cache=False).hidden_states
        # hidden_states[l + 1] is the residual after block l; hidden_states[-1] is after the final norm.
        slots = [hidden_states[layer + 1] for layer in layers] + [hidden_states[-1]]
        stacked = torch.stack(slots, dim=2).flatten(0, 1)  # [batch * seq, n_slots, d]
        writer.add(stacked, batch.flatten())
        n_tokens += batch.numel()
    return n_tokens


def _finished_stage(cfg: DictConfig, name: str) -> Path | None:
    """The finished output of stage `name` for this config (the runner's key rule), or None."""
    from pipeline.orchestration.runner import available_stages, plan_keys
    from pipeline.orchestration.store import StageStore

    stages = available_stages()
    needed = {up: stages[up] for up in stages if up == name or up in stages[name].upstream}
    key = plan_keys(cfg, needed)[0][name]
    store = StageStore(Path(cfg.paths.cache))
    return (
        store.entry(name, str(cfg.model.name), key)
        if store.is_complete(name, str(cfg.model.name), key)
        else None
    )


def preflight_tokenizer(cfg: DictConfig):
    """The model's tokenizer when it is at hand without running a stage (a hub model's or a local
    directory's, or the tiny model's once its backbone stage has finished); None otherwise."""
    from transformers import AutoTokenizer

    from pipeline.models.backbone import source_revision

    model = cfg.model
    if model.source == "tiny":
        backbone = _finished_stage(cfg, "backbone")
        if backbone is None:
            return None
        location, revision = backbone / LOCAL_MODEL_DIR, None
    else:
        location, revision = str(model.source), source_revision(str(model.source), model.revision)
    try:
        return AutoTokenizer.from_pretrained(str(location), revision=revision, trust_remote_code=False)
    except OSError as err:  # not cached and no network: extraction checks the budgets exactly instead
        log.info(
            "preflight: no tokenizer for %s (%s); budgets are checked exactly at extraction", model.name, err
        )
        return None


def check_inputs(cfg: DictConfig) -> None:
    """Cheap checks before any heavy work: disk space for the estimate, and whether every split can hold its
    token budget (pipeline/data/preflight.py: size bounds first, then an exact count with the model's
    tokenizer where one is at hand). A finished extraction for this config needs neither (its key holds the
    budgets), so a rerun of later stages reads no corpus and needs no network."""
    from pipeline.data.preflight import check_budgets
    from pipeline.data.tokens import make_text_source

    if _finished_stage(cfg, "extract") is not None:
        return
    check_disk(cfg, Path(cfg.paths.cache))
    source = make_text_source(cfg.data)
    check_budgets(
        source, cfg.data.budgets, int(cfg.data.seq_len), load_tokenizer=lambda: preflight_tokenizer(cfg)
    )


def run(ctx: StageContext) -> StageOutput:
    from pipeline.data.tokens import make_text_source, token_blocks
    from pipeline.models.backbone import source_revision

    cfg = ctx.cfg
    model, tokenizer = load_from_stage_output(
        ctx.inputs["backbone"], dtype=cfg.model.dtype, device=ctx.device
    )
    source = make_text_source(cfg.data)
    layers = [int(x) for x in cfg.model.head_layers]
    d_model = int(cfg.model.d_model)
    meta = {
        "model": str(cfg.model.name),
        "source": str(cfg.model.source),
        "revision": source_revision(str(cfg.model.source), cfg.model.revision),
        "layers": layers,
        "d_model": d_model,
        "vocab_size": model.get_output_embeddings().out_features,
        "dtype": "float16",
        "model_dtype": str(cfg.model.dtype),
        "seq_len": int(cfg.data.seq_len),
        "splits": {},
    }
    rows = []
    total_tokens, total_seconds = 0, 0.0
    # Every split is tokenized before the first shard is written: a split too small for its budget (one the
    # preflight could not count, e.g. the tiny model's before its tokenizer existed) fails in seconds, not
    # after the train split's extraction.
    budgets = {split: int(cfg.data.budgets.get(split, 0)) for split in SPLITS}
    split_blocks = {
        split: token_blocks(source, tokenizer, split, budget, int(cfg.data.seq_len))
        for split, budget in budgets.items()
        if budget > 0
    }
    for split, blocks in split_blocks.items():
        writer = ShardWriter(
            ctx.out_dir / split,
            n_slots=len(layers) + 1,
            d_model=d_model,
            shard_tokens=int(cfg.extract.shard_tokens),
        )
        started = time.time()
        n_tokens = extract_split(
            model,
            blocks,
            layers,
            writer,
            int(cfg.extract.batch_size),
            ctx.device,
            ctx.progress,
            desc=f"extract {split}",
        )
        seconds = time.time() - started
        index = writer.close()
        stored = sum(
            (ctx.out_dir / split / name).stat().st_size
            for shard in index["shards"]
            for name in (shard["hidden"], shard["tokens"])
        )
        meta["splits"][split] = {
            "n_tokens": n_tokens,
            "n_shards": len(index["shards"]),
            "bytes": stored,
            "seconds": round(seconds, 3),
        }
        log.info(
            "extract %s: %d tokens in %.1f s (%.0f tokens/s), %.1f MiB",
            split,
            n_tokens,
            seconds,
            n_tokens / max(seconds, 1e-9),
            stored / 2**20,
        )
        rows += [
            row("tokens", n_tokens, split=split),
            row("tokens_per_s", n_tokens / max(seconds, 1e-9), split=split),
        ]
        total_tokens += n_tokens
        total_seconds += seconds
    (ctx.out_dir / META_FILE).write_text(json.dumps(meta, indent=2))
    bytes_per_token = sum(s["bytes"] for s in meta["splits"].values()) / max(total_tokens, 1)
    rows.append(row("bytes_per_token", bytes_per_token))
    metrics = {
        "tokens": total_tokens,
        "tokens_per_s": total_tokens / max(total_seconds, 1e-9),
        "bytes_per_token": bytes_per_token,
    }
    ctx.tracker.summary(metrics)
    return StageOutput(rows=rows, metrics=metrics)


def read_meta(extract_dir: str | Path) -> dict:
    path = Path(extract_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; rerun the extract stage (force=[extract])")
    return json.loads(path.read_text())


STAGE = Stage(
    name="extract", upstream=("backbone",), run=run, group="extract", key_facts=key_facts, checks=check_inputs
)
