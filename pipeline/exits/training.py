"""Training early-exit heads with Lightning, and scoring heads (trained or logit lens) on held-out tokens.

`train_heads` is what the `heads` stage calls; it can equally be used from a notebook:

    heads, metrics = train_heads(model, [1, 2, 3, 4], "<extract dir>/train", heads_cfg, trainer_cfg,
                                 seed=0, out_dir="outputs/my_heads")

Config split: `heads_cfg` (conf/heads/*.yaml) holds what changes the result (head type, init, optimiser,
steps, batch size); `trainer_cfg` (conf/trainer/*.yaml) holds where it runs (accelerator, devices,
strategy, precision) and is passed through to `lightning.Trainer`, except the keys this module sets itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger
from torch import nn

from lightning_modules.heads_module import HeadsModule, kl_full_to_head, teacher_logits_of
from lightning_modules.hidden_states import HiddenStatesDataModule
from pipeline.data.shards import ShardReader
from pipeline.exits.heads import EarlyExitHeads
from pipeline.models.backbone import unembedding_of

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
# Trainer arguments owned by this module (derived from heads_cfg / the call), not by conf/trainer.
_RESERVED_TRAINER_KEYS = {
    "max_steps",
    "max_epochs",
    "val_check_interval",
    "check_val_every_n_epoch",
    "callbacks",
    "logger",
    "enable_progress_bar",
    "default_root_dir",
}
# conf/trainer keys that are not Trainer arguments.
_NON_TRAINER_KEYS = {"float32_matmul_precision"}


def _plain(cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """A plain dict from a dict or an OmegaConf DictConfig (resolved)."""
    if cfg is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover - omegaconf ships with hydra, a project dependency
        pass
    return dict(cfg)


def heads_settings(heads_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """heads_cfg with the schema's defaults filled in (pipeline/config/stages.py, HeadsConfig); unknown keys
    are rejected (a typo would otherwise be ignored)."""
    from pipeline.config import group_values

    return group_values("heads", _plain(heads_cfg))


class ThroughputMonitor(Callback):
    """Training tokens/s, over the steady state: from the end of step `skip` to the last step, with
    validation time excluded (data loading and the optimizer step are included)."""

    def __init__(self, batch_tokens: int, skip: int = 2):
        self.batch_tokens, self.skip = batch_tokens, skip
        self.tokens_per_step = batch_tokens
        self._steps = 0
        self._t0: float | None = None
        self._t_last: float | None = None
        self._val_time = 0.0
        self._val_start: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Tokens consumed per optimizer step, across every data-parallel rank.
        self.tokens_per_step = self.batch_tokens * trainer.world_size * trainer.accumulate_grad_batches

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._steps += 1
        if self._steps == self.skip:
            self._t0, self._val_time = time.perf_counter(), 0.0
        self._t_last = time.perf_counter()
        # Also logged as metrics: they reach the tracker, and with a spawning strategy (ddp_spawn) the
        # callback metrics are what comes back from the workers to the main process.
        pl_module.log("train/global_step", float(trainer.global_step), on_step=True, on_epoch=False)
        if self.tokens_per_s is not None:
            pl_module.log("train/tokens_per_s", self.tokens_per_s, on_step=True, on_epoch=False)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._val_start is not None and self._t0 is not None:
            self._val_time += time.perf_counter() - self._val_start

    @property
    def tokens_per_s(self) -> float | None:
        if self._t0 is None or self._t_last is None or self._steps <= self.skip:
            return None
        elapsed = self._t_last - self._t0 - self._val_time
        return (self._steps - self.skip) * self.tokens_per_step / elapsed if elapsed > 0 else None


def build_trainer(
    trainer_cfg: Mapping[str, Any] | None,
    heads_cfg: Mapping[str, Any] | None,
    ckpt_dir: str | Path,
    logger: Logger | Sequence[Logger] | bool | None = None,
    progress: bool = True,
    callbacks: Sequence[Callback] = (),
) -> L.Trainer:
    """A Lightning Trainer from conf/trainer (+ steps, validation and checkpoint cadence from conf/heads).

    `logger=None` logs to CSV next to the checkpoints; pass a WandbLogger when tracking is on, or False.
    """
    tcfg, hcfg = _plain(trainer_cfg), heads_settings(heads_cfg)
    clash = set(tcfg) & _RESERVED_TRAINER_KEYS
    if clash:
        raise ValueError(f"conf/trainer must not set {sorted(clash)}: they come from conf/heads or the stage")
    matmul_precision = tcfg.pop("float32_matmul_precision", None)
    if matmul_precision:
        torch.set_float32_matmul_precision(matmul_precision)
    tcfg = {k: v for k, v in tcfg.items() if k not in _NON_TRAINER_KEYS}

    ckpt_dir = Path(ckpt_dir)
    every = int(hcfg["checkpoint_every_n_steps"] or hcfg["val_every_n_steps"])
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="step{step}",
        save_last=True,
        save_top_k=0,
        every_n_train_steps=every,
        enable_version_counter=False,
    )
    all_callbacks: list[Callback] = [checkpoint, *callbacks]
    if progress:
        all_callbacks.append(TQDMProgressBar(refresh_rate=10))
    if logger is None:
        # One version_<n> folder per (re)start: a resumed run must not overwrite the interrupted run's log.
        logger = CSVLogger(save_dir=str(ckpt_dir.parent), name="logs")
    max_steps = int(hcfg["max_steps"])
    return L.Trainer(
        max_steps=max_steps,
        max_epochs=-1,  # the training stream is infinite; max_steps ends training
        # The training loader has no length, so validation runs every N optimizer steps, not per epoch.
        val_check_interval=min(int(hcfg["val_every_n_steps"]), max_steps),
        check_val_every_n_epoch=None,
        callbacks=all_callbacks,
        logger=logger,
        enable_progress_bar=progress,
        enable_model_summary=progress,
        default_root_dir=str(ckpt_dir.parent),
        **tcfg,
    )


def train_heads(
    backbone: nn.Module,
    head_layers: Sequence[int],
    reader_dir: str | Path,
    heads_cfg: Mapping[str, Any] | None,
    trainer_cfg: Mapping[str, Any] | None,
    seed: int,
    out_dir: str | Path,
    logger: Logger | Sequence[Logger] | bool | None = None,
    progress: bool = True,
    val_dir: str | Path | None = None,
    ckpt_dir: str | Path | None = None,
    backbone_id: str = "",
    backbone_revision: str | None = None,
    callbacks: Sequence[Callback] = (),
) -> tuple[EarlyExitHeads, dict[str, Any]]:
    """Train one head per layer of `head_layers` on the shards in `reader_dir`; save them to `out_dir`.

    Resumes from `<ckpt_dir>/last.ckpt` when it exists (default ckpt_dir: `<out_dir>/checkpoints`).
    Returns the trained heads (on CPU, eval mode) and metrics: per-head held-out KL and top-1 agreement of
    the trained heads and of the logit lens on the same tokens, steps, tokens/s. Under DDP only global rank 0
    writes files and evaluates; other ranks return their heads and `{"global_rank": r}`.
    Raises NonFiniteLossError if the loss turns NaN/inf (the last good checkpoint is kept).
    `callbacks` are extra Lightning callbacks (Lightning runs checkpointing after them).
    """
    hcfg = heads_settings(heads_cfg)
    out_dir = Path(out_dir)
    ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else out_dir / CHECKPOINT_DIR
    L.seed_everything(seed, workers=True, verbose=False)

    data = HiddenStatesDataModule(
        reader_dir,
        batch_tokens=hcfg["batch_tokens"],
        val_tokens=hcfg["val_tokens"],
        val_dir=val_dir,
        num_workers=hcfg["num_workers"],
        seed=seed,
        val_batch_tokens=hcfg["eval_batch_tokens"],
        pin_memory=_plain(trainer_cfg).get("accelerator") in ("gpu", "cuda"),
    )
    if data.n_heads != len(head_layers):
        raise ValueError(
            f"the shards in {reader_dir} hold {data.n_heads} head layers but {len(head_layers)} heads were "
            f"requested ({list(head_layers)}): extract and heads configs disagree"
        )
    heads = EarlyExitHeads.from_backbone(
        backbone,
        list(head_layers),
        head_type=hcfg["head_type"],
        init=hcfg["init"],
        mlp_ratio=hcfg["mlp_ratio"],
        backbone_id=backbone_id,
        backbone_revision=backbone_revision,
        seed=seed,
    )
    if heads.spec.d_model != data.d_model:
        raise ValueError(f"shards have d_model={data.d_model}, the backbone {heads.spec.d_model}")
    unembed = unembedding_of(backbone)
    module = HeadsModule(
        heads,
        unembed.weight,
        unembed.bias,
        lr=hcfg["lr"],
        weight_decay=hcfg["weight_decay"],
        betas=tuple(hcfg["betas"]),
        warmup_steps=hcfg["warmup_steps"],
        max_steps=hcfg["max_steps"],
        min_lr_ratio=hcfg["min_lr_ratio"],
    )

    throughput = ThroughputMonitor(hcfg["batch_tokens"])
    trainer = build_trainer(
        trainer_cfg, hcfg, ckpt_dir, logger=logger, progress=progress, callbacks=[throughput, *callbacks]
    )
    last = ckpt_dir / LAST_CHECKPOINT
    resume = str(last) if last.is_file() else None
    if resume:
        log.info("resuming head training from %s", resume)
    started = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    train_seconds = time.perf_counter() - started

    heads = module.heads.to("cpu").float().eval()
    if not trainer.is_global_zero:
        return heads, {"global_rank": trainer.global_rank}

    heads.save(out_dir)
    # trainer.global_step is the truth in-process; under ddp_spawn the main process only gets the workers'
    # logged metrics back.
    steps = trainer.global_step or int(_float_or_none(trainer.callback_metrics.get("train/global_step")) or 0)
    tokens_per_s = throughput.tokens_per_s or _float_or_none(
        trainer.callback_metrics.get("train/tokens_per_s")
    )
    tokens_per_step = hcfg["batch_tokens"] * trainer.world_size * trainer.accumulate_grad_batches
    # Both methods are scored on the validation slice the DataModule held out from training.
    eval_reader = ShardReader(val_dir if val_dir is not None else reader_dir)
    n_eval = data.val_range[1] - data.val_range[0]
    device = "cuda" if trainer.accelerator.__class__.__name__ == "CUDAAccelerator" else "cpu"
    lens = logit_lens(backbone, list(head_layers))
    metrics: dict[str, Any] = {
        "layers": list(head_layers),
        "trained": evaluate_heads(heads, eval_reader, unembed, n_eval, hcfg["eval_batch_tokens"], device),
        "logit_lens": evaluate_heads(lens, eval_reader, unembed, n_eval, hcfg["eval_batch_tokens"], device),
        "eval_tokens": n_eval,
        "steps": steps,
        "train_tokens": steps * tokens_per_step,
        "train_seconds": train_seconds,
        "train_tokens_per_s": tokens_per_s,
        "final_train_loss": _float_or_none(trainer.callback_metrics.get("train/loss")),
        "resumed_from": resume,
        "global_rank": 0,
    }
    return heads, metrics


def logit_lens(backbone: nn.Module, layers: Sequence[int]) -> EarlyExitHeads:
    """The untrained baseline: the backbone's own final norm + unembedding applied at each layer."""
    return EarlyExitHeads.from_backbone(backbone, list(layers), "linear", "unembedding").eval()


@torch.no_grad()
def evaluate_heads(
    heads: EarlyExitHeads,
    reader: ShardReader,
    unembedding: nn.Linear | torch.Tensor,
    n_tokens: int,
    batch_tokens: int = 4096,
    device: str | torch.device = "cpu",
) -> list[dict[str, float]]:
    """Per head, on the last `n_tokens` tokens of `reader` (the held-out tail of a training split):
    mean KL(p_full || p_head) and top-1 agreement with the full model, in float32.

    Returns one dict per head: {"head": i, "layer": block index, "kl": ..., "agree": ..., "n_tokens": ...}.
    """
    weight = unembedding.weight if isinstance(unembedding, nn.Linear) else unembedding
    bias = unembedding.bias if isinstance(unembedding, nn.Linear) else None
    weight = weight.detach().to(device, torch.float32)
    bias = None if bias is None else bias.detach().to(device, torch.float32)
    n_total = len(reader)
    start = max(0, n_total - int(n_tokens))
    was_training = heads.training
    home = next(heads.parameters()).device
    heads.to(device).eval()
    kl_sum = torch.zeros(len(heads), dtype=torch.float64)
    agree_sum = torch.zeros(len(heads), dtype=torch.float64)
    for lo in range(start, n_total, batch_tokens):
        head_hidden, final_hidden, _ = reader.slice(lo, lo + batch_tokens)
        head_hidden, final_hidden = head_hidden.to(device), final_hidden.to(device)
        teacher = teacher_logits_of(final_hidden, weight, bias)
        top1 = teacher.argmax(dim=-1)
        for i in range(len(heads)):
            logits = heads(i, head_hidden[:, i]).float()
            kl_sum[i] += kl_full_to_head(teacher, logits).double().sum().cpu()
            agree_sum[i] += (logits.argmax(dim=-1) == top1).double().sum().cpu()
    heads.to(home).train(was_training)
    n = n_total - start
    return [
        {
            "head": i,
            "layer": int(layer),
            "kl": float(kl_sum[i] / n),
            "agree": float(agree_sum[i] / n),
            "n_tokens": n,
        }
        for i, layer in enumerate(heads.layers)
    ]


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)
