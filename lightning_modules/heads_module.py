"""LightningModule that trains all early-exit heads at once against the frozen backbone's own predictions.

Self-supervised objective (docs/design.md §1.2): for every head, KL(p_full || p_head) at temperature 1 over the
full vocabulary, averaged over tokens, then over heads. The teacher distribution is never stored: it is
recomputed each step as `unembedding(final post-norm hidden state)` from a frozen copy of the backbone's
output embedding, kept as a non-persistent buffer (it belongs to the backbone, so neither checkpoints nor
the heads artifact carry it).
"""

from __future__ import annotations

import math
from dataclasses import asdict

import lightning as L
import torch
import torch.nn.functional as F

from pipeline.exits.heads import EarlyExitHeads


def kl_full_to_head(teacher_logits: torch.Tensor, head_logits: torch.Tensor) -> torch.Tensor:
    """Per-token KL(p_full || p_head) [n], in float32 whatever the inputs' dtype.

    Under bf16 autocast the logits may arrive in bf16; log-softmax over ~50k classes in bf16 loses the
    small probabilities that dominate the KL's tail, so both sides are upcast first.
    """
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)
    log_q = F.log_softmax(head_logits.float(), dim=-1)
    # kl_div(input=log q, target=log p, log_target=True) = sum p * (log p - log q).
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=-1)


def teacher_logits_of(
    final_hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Full-model logits from the stored post-norm final hidden state, always in float32 (the target)."""
    with torch.autocast(device_type=final_hidden.device.type, enabled=False):
        return F.linear(final_hidden.float(), weight.float(), None if bias is None else bias.float())


def lr_lambda(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to `min_lr_ratio` at `max_steps` (multiplier of the base lr)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; training stops, the last good checkpoint is kept."""


class HeadsModule(L.LightningModule):
    """Trains `heads` (one per configured layer) to mimic the backbone's next-token distribution.

    Args:
        heads: the EarlyExitHeads to train (e.g. `EarlyExitHeads.from_backbone(...)`).
        unembedding: the backbone's output-embedding weight [vocab, d_model]; copied into a frozen buffer.
        unembedding_bias: its bias, if the backbone has one (Pythia has none).
        lr, weight_decay, betas, warmup_steps, max_steps, min_lr_ratio: AdamW + warm-up/cosine schedule.
    """

    def __init__(
        self,
        heads: EarlyExitHeads,
        unembedding: torch.Tensor,
        unembedding_bias: torch.Tensor | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 50,
        max_steps: int = 1000,
        min_lr_ratio: float = 0.0,
    ):
        super().__init__()
        # Only plain values go into hparams (torch >= 2.6 loads checkpoints with weights_only=True, which
        # refuses arbitrary pickled objects): the modules/tensors are ignored, the spec is stored as a dict.
        self.save_hyperparameters(ignore=["heads", "unembedding", "unembedding_bias"])
        self.hparams["betas"] = [float(b) for b in betas]
        self.hparams["heads_spec"] = asdict(heads.spec)
        # The heads' norms are deep copies of the backbone's final norm, which arrive frozen
        # (requires_grad=False) and in eval mode when the backbone is; every head parameter is trained.
        self.heads = heads.requires_grad_(True).train()
        self.register_buffer("unembedding", unembedding.detach().clone().float(), persistent=False)
        self.register_buffer(
            "unembedding_bias",
            None if unembedding_bias is None else unembedding_bias.detach().clone().float(),
            persistent=False,
        )

    @property
    def n_heads(self) -> int:
        return len(self.heads)

    def per_head_kl(
        self, head_hidden: torch.Tensor, final_hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean KL per head [n_heads], top-1 agreement per head [n_heads]) on one batch."""
        with torch.no_grad():
            teacher = teacher_logits_of(final_hidden, self.unembedding, self.unembedding_bias)
            teacher_top1 = teacher.argmax(dim=-1)
        kls, agrees = [], []
        for i in range(self.n_heads):
            logits = self.heads(i, head_hidden[:, i])
            kls.append(kl_full_to_head(teacher, logits).mean())
            agrees.append((logits.detach().argmax(dim=-1) == teacher_top1).float().mean())
        return torch.stack(kls), torch.stack(agrees)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        head_hidden, final_hidden = batch
        kls, _ = self.per_head_kl(head_hidden, final_hidden)
        loss = kls.mean()
        self._stop_if_not_finite(loss)
        n = head_hidden.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        for i, kl in enumerate(kls):
            self.log(f"train/kl_head{i}", kl, batch_size=n)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        head_hidden, final_hidden = batch
        kls, agrees = self.per_head_kl(head_hidden, final_hidden)
        n = head_hidden.shape[0]
        # batch_size=n: epoch means are token-weighted (the last chunk may be shorter).
        self.log("val/loss", kls.mean(), prog_bar=True, batch_size=n, sync_dist=True)
        for i in range(self.n_heads):
            self.log(f"val/kl_head{i}", kls[i], batch_size=n, sync_dist=True)
            self.log(f"val/agree_head{i}", agrees[i], batch_size=n, sync_dist=True)

    def _stop_if_not_finite(self, loss: torch.Tensor) -> None:
        # Raised before backward/optimizer step, so the weights (and the last checkpoint) stay good. Under DDP
        # every rank must stop together, or the healthy ranks would hang in the next gradient all-reduce.
        bad = not bool(torch.isfinite(loss))
        if self._trainer is not None and self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise NonFiniteLossError(
                f"training loss is {loss.item()} at global step {self.global_step}: stopping. The last good "
                "checkpoint is kept (rerun to resume from it); try a lower heads.lr, precision=32-true, or "
                "check the extracted hidden states for overflow."
            )

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(
            self.heads.parameters(), lr=hp.lr, weight_decay=hp.weight_decay, betas=tuple(hp.betas)
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_lambda(step, hp.warmup_steps, hp.max_steps, hp.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
