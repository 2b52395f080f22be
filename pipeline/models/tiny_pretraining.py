"""Pretraining the offline tiny backbone (`pipeline.models.tiny_model`) from scratch on CPU.

It must be *clearly trained* — early exits only make sense when deeper layers know more than shallow ones —
yet cheap: the default config pretrains in a few minutes on 2 CPU cores. The returned metrics include the
logit-lens agreement of every intermediate block with the final layer, the depth gradient early exit needs.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from pipeline.data.tokens import TextSource, token_blocks
from pipeline.models.tiny_model import build_model, resolve_tiny_config, train_tokenizer

if TYPE_CHECKING:  # transformers is imported lazily: it is slow to import and only needed when training
    from transformers import GPTNeoXForCausalLM

log = logging.getLogger(__name__)


def capped(texts: Iterator[str], max_bytes: int) -> Iterator[str]:
    """`texts` until `max_bytes` characters have been yielded (the last text is whole)."""
    seen = 0
    for text in texts:
        if seen >= max_bytes:
            return
        seen += len(text)
        yield text


def _adamw(
    params: list[torch.nn.Parameter], cfg: Mapping[str, Any], embedding: torch.nn.Parameter
) -> torch.optim.AdamW:
    # Decay matrices only: decaying LayerNorm gains and biases just fights the normalisation. The input
    # embedding has its own learning rate and decay (by default larger, and none): each row only gets a
    # gradient when its token occurs, so at the default lr the rare rows barely move in a short run.
    lr = float(cfg["lr"])
    groups = [
        {
            "params": [p for p in params if p.dim() >= 2 and p is not embedding],
            "weight_decay": float(cfg["weight_decay"]),
        },
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if any(p is embedding for p in params):
        groups.append(
            {
                "params": [embedding],
                "weight_decay": float(cfg["embedding_weight_decay"]),
                "lr": lr * float(cfg["embedding_lr_scale"]),
            }
        )
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(float(b) for b in cfg["betas"]))


def orthogonalize(matrix: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Newton–Schulz iteration towards the nearest semi-orthogonal matrix (Muon's; Keller Jordan's quintic
    coefficients): the result keeps `matrix`'s singular vectors with singular values pushed into about
    [0.7, 1.2] (those far below the largest stay smaller). `matrix` may be a stack [..., rows, cols], each
    matrix orthogonalised on its own (Muon batches same-shape weights: fewer, larger matmuls). Computed in
    float32: torch.optim.Muon runs it in bf16, which CPUs without AVX512-BF16/AMX emulate slowly (it doubled
    the step time here)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    wide = matrix.size(-2) <= matrix.size(-1)
    x = matrix if wide else matrix.mT
    # Spectral norm <= Frobenius norm = 1: inside the iteration's range.
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.mT


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weights: Nesterov momentum, orthogonalised (`orthogonalize`), scaled by
    0.2 * sqrt(max(rows, cols)) so that an update's RMS matches a typical AdamW update's (Moonlight's rule:
    the AdamW learning rate and weight decay carry over), and decoupled weight decay."""

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        lr: float,
        momentum: float = 0.95,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
    ):
        if any(p.dim() != 2 for p in params):
            raise ValueError("Muon updates 2-D weights only; give the others to AdamW")
        super().__init__(
            params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "ns_steps": ns_steps}
        )

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # no closure: one gradient per step
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            by_shape: dict[torch.Size, list[torch.nn.Parameter]] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(p.shape, []).append(p)
            for shape, params in by_shape.items():
                nesterov = []
                for p in params:
                    buffer = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                    buffer.lerp_(p.grad, 1 - momentum)
                    nesterov.append(p.grad.lerp(buffer, momentum))
                updates = orthogonalize(torch.stack(nesterov), group["ns_steps"])
                for p, update in zip(params, updates, strict=True):
                    p.mul_(1 - lr * group["weight_decay"])
                    p.add_(update, alpha=-lr * 0.2 * math.sqrt(max(shape)))


def _optimizers(model: torch.nn.Module, cfg: Mapping[str, Any]) -> list[torch.optim.Optimizer]:
    """`adamw`: AdamW on everything. `muon`: Muon on the blocks' weight matrices (attention and MLP), AdamW on
    the embedding, the unembedding, the norms and the biases (Muon's usual split: the embedding and the output
    layer are not hidden linear maps). Same learning rate, schedule and weight decay for both."""
    params = [p for p in model.parameters() if p.requires_grad]
    embedding = model.get_input_embeddings().weight
    if cfg["optimizer"] == "adamw":
        return [_adamw(params, cfg, embedding)]
    blocks = {id(p) for p in model.gpt_neox.layers.parameters() if p.dim() == 2}
    hidden = [p for p in params if id(p) in blocks]
    return [
        _adamw([p for p in params if id(p) not in blocks], cfg, embedding),
        Muon(hidden, lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"])),
    ]


def lr_factor(
    step: int,
    total_steps: int,
    warmup_steps: int,
    min_ratio: float,
    schedule: str = "cosine",
    cooldown_fraction: float = 0.5,
) -> float:
    """Linear warmup to 1, then `cosine`: cosine decay to `min_ratio` at the last step; `wsd` (warmup-stable-
    decay): constant, then a linear decay to `min_ratio` over the last `cooldown_fraction` of the steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "wsd":
        decay_steps = max(1, round(cooldown_fraction * total_steps))
        into_decay = step - (total_steps - decay_steps)
        if into_decay < 0:
            return 1.0
        return min_ratio + (1.0 - min_ratio) * (1.0 - into_decay / decay_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _batch_indices(n_blocks: int, batch_size: int, n_steps: int, seed: int) -> Iterator[torch.Tensor]:
    """`n_steps` full batches of block indices: a fresh permutation per pass, and a batch that crosses a
    pass boundary takes the rest of one permutation and the start of the next. The order depends only on
    `seed`, never on the global RNG state."""
    generator = torch.Generator().manual_seed(seed)
    pending = torch.empty(0, dtype=torch.long)
    for _ in range(n_steps):
        while len(pending) < batch_size:
            pending = torch.cat([pending, torch.randperm(n_blocks, generator=generator)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU executes bf16 matmuls natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated
    and slower than fp32. Linux only: reads /proc/cpuinfo, and says False when it cannot tell."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --- evaluation ----------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_lm(
    model: GPTNeoXForCausalLM,
    blocks: torch.Tensor,
    batch_size: int = 64,
    progress: bool = False,
    lens_tokens: int | None = None,
) -> dict[str, Any]:
    """Held-out loss/perplexity on every block, and the logit lens on the first `lens_tokens` tokens (whole
    blocks, at least one; None: all): how often each block's output, put through the final LayerNorm and the
    unembedding, has the same argmax as the full model.

    The logit lens is exactly what an untrained early-exit head would predict (the head is initialised as
    a copy of that norm + projection), so it previews how much room early exit has at each depth. It costs
    one vocabulary projection per block and token — on the tiny model 5 projections against ~3 blocks' worth
    of a forward pass — so it is measured on a prefix: its agreement is a preview, the heads stage measures
    the lens properly.
    """
    from pipeline.models.backbone import final_norm_of, unembedding_of

    model.eval()
    norm, unembed = final_norm_of(model), unembedding_of(model)
    n_layers = model.config.num_hidden_layers
    seq_len = blocks.size(1)
    lens_blocks = len(blocks) if lens_tokens is None else max(1, int(lens_tokens) // seq_len)
    nll_sum, n_pred, n_tok, n_lens = 0.0, 0, 0, 0
    agree = torch.zeros(n_layers - 1, dtype=torch.long)
    for start in tqdm(range(0, len(blocks), batch_size), desc="eval", disable=not progress, leave=False):
        batch = blocks[start : start + batch_size]
        lens_batch = batch[: max(0, lens_blocks - start)]
        out = model(input_ids=batch, output_hidden_states=len(lens_batch) > 0)
        logits = out.logits.float()
        nll_sum += torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum"
        ).item()
        n_pred += batch[:, 1:].numel()
        n_tok += batch.numel()
        if len(lens_batch) == 0:
            continue
        final_top = logits[: len(lens_batch)].argmax(-1)
        # hidden_states[0] is the embedding output, [i] the (pre-norm) output of block i-1, and the last
        # entry is already post-norm: it is the final layer itself and skipped.
        for block in range(n_layers - 1):
            lens_top = unembed(norm(out.hidden_states[block + 1][: len(lens_batch)])).argmax(-1)
            agree[block] += (lens_top == final_top).sum()
        n_lens += lens_batch.numel()
    val_loss = nll_sum / n_pred
    return {
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss),
        "eval_tokens": n_tok,
        # Keyed by 0-based block index, the convention of `model.head_layers`.
        "logit_lens_agreement": {b: agree[b].item() / n_lens for b in range(n_layers - 1)},
    }


# --- pretraining -----------------------------------------------------------------------------------------------


def pretrain_tiny_model(
    tiny_cfg: Mapping[str, Any], source: TextSource, out_dir: Path, progress: bool = True
) -> dict[str, Any]:
    """Train the tokenizer and the model on `source`'s train split, evaluate on its validation split, and
    `save_pretrained` both into `out_dir` (created), so `load_backbone(out_dir)` loads them.

    Deterministic given `tiny_cfg` (its `seed`), the corpus and the thread count: the seed fixes the
    initialisation and the block order, and the corpus order is fixed by the source.
    Returns scalar metrics plus `logit_lens_agreement` ({block index: fraction}).
    """
    cfg = resolve_tiny_config(tiny_cfg)
    out_dir = Path(out_dir)
    with _torch_threads(cfg["num_threads"]):
        t0 = time.perf_counter()
        tokenizer = train_tokenizer(
            capped(source.documents("train"), int(cfg["tokenizer_max_bytes"])),
            vocab_size=int(cfg["vocab_size"]),
            min_frequency=int(cfg["tokenizer_min_frequency"]),
            model_max_length=int(cfg["max_position_embeddings"]),
        )
        tokenizer_seconds = time.perf_counter() - t0
        log.info("tokenizer: %d tokens trained in %.1fs", len(tokenizer), tokenizer_seconds)

        seq_len = int(cfg["seq_len"])
        t0 = time.perf_counter()
        # `train_tokens` counts tokens *processed*; batches are drawn from the first `train_pool_tokens` of
        # the train split (all of it when smaller: every module of the corpus, not just the first ones), and
        # a pool smaller than `train_tokens` is cycled through again rather than failing the default run.
        train = token_blocks(
            source,
            tokenizer,
            "train",
            max(int(cfg["train_pool_tokens"]), seq_len),
            seq_len,
            budget_key="model.tiny.train_pool_tokens",
            allow_short=True,
        )
        val = token_blocks(
            source,
            tokenizer,
            "validation",
            int(cfg["eval_tokens"]),
            seq_len,
            budget_key="model.tiny.eval_tokens",
        )
        tokenize_seconds = time.perf_counter() - t0
        log.info(
            "data: %d train blocks, %d validation blocks of %d tokens (%.1fs)",
            len(train),
            len(val),
            seq_len,
            tokenize_seconds,
        )

        torch.manual_seed(int(cfg["seed"]))
        model = build_model(cfg, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
        n_params = sum(p.numel() for p in model.parameters())
        log.info(
            "model: GPT-NeoX %d layers, d_model %d, %.2fM parameters",
            cfg["num_layers"],
            cfg["d_model"],
            n_params / 1e6,
        )

        batch_size = int(cfg["batch_size"])
        total_steps = max(1, int(cfg["train_tokens"]) // (batch_size * seq_len))
        epochs = total_steps * batch_size / len(train)
        if epochs > 1.0:
            log.info(
                "train split holds %d tokens: %.2f passes over it for model.tiny.train_tokens=%d",
                train.numel(),
                epochs,
                int(cfg["train_tokens"]),
            )
        optimizers = _optimizers(model, cfg)
        schedulers = [
            torch.optim.lr_scheduler.LambdaLR(
                optimizer,
                lambda s: lr_factor(
                    s,
                    total_steps,
                    int(cfg["warmup_steps"]),
                    float(cfg["min_lr_ratio"]),
                    cfg["schedule"],
                    float(cfg["cooldown_fraction"]),
                ),
            )
            for optimizer in optimizers
        ]

        model.train()
        # bf16-mixed: weights, optimizer and the saved model stay fp32; only the matmuls run in bf16, which
        # CPUs with AVX512-BF16/AMX execute faster. Evaluation is always fp32.
        bf16 = cfg["precision"] == "bf16-mixed"
        if bf16 and not cpu_has_native_bf16():
            log.warning(
                "this CPU has no native bf16 (AVX512-BF16/AMX): pretraining will be slow; "
                "set model.tiny.precision=fp32"
            )
        losses: list[float] = []
        t0, cpu0 = time.perf_counter(), time.process_time()
        bar = tqdm(total=total_steps, desc="pretrain tiny", unit="step", disable=not progress)
        for batch_index in _batch_indices(len(train), batch_size, total_steps, int(cfg["seed"])):
            batch = train[batch_index]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg["grad_clip"]))
            for optimizer, scheduler in zip(optimizers, schedulers, strict=True):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
            losses.append(loss.item())
            bar.update(1)
            if len(losses) % 10 == 0:
                elapsed = time.perf_counter() - t0
                recent, tok_s = sum(losses[-10:]) / 10, len(losses) * batch_size * seq_len / elapsed
                bar.set_postfix(loss=f"{recent:.3f}", tok_s=f"{tok_s:.0f}")
                # Also in the log (every ~10% of training), for runs without a terminal.
                if len(losses) % max(10, total_steps // 10 // 10 * 10) == 0:
                    log.info(
                        "step %d/%d: loss %.3f, lr %.2e, %.0f tok/s",
                        len(losses),
                        total_steps,
                        recent,
                        schedulers[0].get_last_lr()[0],
                        tok_s,
                    )
        bar.close()
        train_seconds = time.perf_counter() - t0
        # CPU time next to wall time, to tell a slow run from a crowded machine. Not a clean substitute:
        # OpenMP threads spin while waiting, so contention inflates CPU time as well.
        train_cpu_seconds = time.process_time() - cpu0
        tokens_seen = total_steps * batch_size * seq_len

        t0 = time.perf_counter()
        evaluation = evaluate_lm(
            model,
            val,
            batch_size=int(cfg["eval_batch_size"]),
            progress=progress,
            lens_tokens=int(cfg["lens_eval_tokens"]),
        )
        eval_seconds = time.perf_counter() - t0

    tail = losses[-min(20, len(losses)) :]
    metrics: dict[str, Any] = {
        "n_params": n_params,
        "n_layers": int(cfg["num_layers"]),
        "d_model": int(cfg["d_model"]),
        "vocab_size": len(tokenizer),
        "train_tokens": tokens_seen,
        "train_steps": len(losses),
        "train_epochs": epochs,
        "train_pool_tokens": train.numel(),
        "train_seconds": train_seconds,
        "tokens_per_s": tokens_seen / train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "tokenizer_seconds": tokenizer_seconds,
        "tokenize_seconds": tokenize_seconds,
        "eval_seconds": eval_seconds,
        "initial_train_loss": losses[0],
        "final_train_loss": sum(tail) / len(tail),
        **evaluation,
        # The same agreement as flat scalars, so it lands in the results table next to the other metrics.
        **{f"lens_agreement_block{b}": a for b, a in evaluation["logit_lens_agreement"].items()},
        "corpus_fingerprint": source.fingerprint,
        "num_threads": int(cfg["num_threads"] or torch.get_num_threads()),
    }
    log.info(
        "pretrained in %.0fs (%.0f tok/s): held-out ppl %.2f (evaluated in %.0fs); logit lens vs final: %s",
        train_seconds,
        metrics["tokens_per_s"],
        metrics["val_ppl"],
        eval_seconds,
        ", ".join(f"block {b}: {a:.0%}" for b, a in metrics["logit_lens_agreement"].items()),
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # A human-readable record next to the weights: what was trained on what, and how well.
    record = {"config": cfg, "metrics": metrics}
    (out_dir / "pretraining.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    return metrics
