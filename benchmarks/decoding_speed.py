"""Decoding speed: transformers' greedy `generate` vs our engine's greedy, early exit, LayerSkip and DSSD.

A thin command line over the decoding harness (pipeline/evaluation/decoding_harness.py), the one the
pipeline's `decoding` stage runs: the same settings, interleaved per prompt (load changes hit every method
alike), the same losslessness check and LayerSkip tuning. Printed per model: tokens/s (median over repeats of
each repeat's tokens/s over all prompts, with min and max), its ratio to `generate` in the same repeat
(median), layer- and latency-equivalents per generated token, acceptance rate, accepted drafts per
verification, and whether the output is identical to greedy `generate` on every prompt; then the oracle
bound.

Usage:
    python benchmarks/decoding_speed.py                  # the default run's own outputs (outputs/cache, tiny)
    python benchmarks/decoding_speed.py --from-outputs outputs/ --model tiny --eps 0.8 0.9
    python benchmarks/decoding_speed.py --model-dir M --heads-dir H --thresholds T.json [--eps 0.8 0.9]
    python benchmarks/decoding_speed.py --shapes tiny pythia-70m pythia-160m   # random weights, real shapes
    python benchmarks/decoding_speed.py --no-llama            # skip the Llama / assistant_early_exit section
    python benchmarks/decoding_speed.py --temperature 0.7 1.0 [--top-k 50] [--top-p 0.9]   # also sampled

With --from-outputs (the default), the stage store under <outputs>/cache gives the latest finished `calibrate`
entry for the model and the backbone, heads and extract entries it was computed from (its upstream keys), so
the three always belong together (pipeline/evaluation/stage_outputs.py); their files are checked against their
completion records before use. Prompts are windows of the test split (tuning prompts: validation split) of the
data the `extract` stage read, as in the pipeline's `decoding` stage.

transformers' own early-exit assistant (`generate(assistant_early_exit=k)`, LayerSkip-style self-speculation)
is benchmarked on a small random-weight LlamaForCausalLM built locally, next to our LayerSkip with the same
drafter (block k-1's output through the final norm and the LM head: exactly what transformers drafts with)
and the same draft length. It is shown only for Llama: on GPT-NeoX (Pythia) transformers' assistant_early_exit
silently runs the FULL model (its layer loop ignores `num_hidden_layers`, docs/design.md §6), so a row there
would look lossless and merely slow. The Llama model scales its token embeddings (×10) so that the residual
stream, and hence the early exits, stay close to the final layer's prediction: random weights otherwise give
early exits that almost never agree with the full model, and every speculative method would only pay for
drafts.

Random-weight models get logit-lens heads (each head = the model's own final norm + unembedding): on random
weights the residual stream barely changes across blocks, so these heads often agree with the full model —
a stand-in for trained heads that lets the speculative paths run at realistic acceptance. Their thresholds
are calibrated on the fly (the paper's empirical rule, `pipeline.exits.calibration`) on the tuning prompts,
where the LayerSkip setting (head, d) and the tuned DSSD (ε, consulted heads, draft cap) are tuned too, by
layer-equivalents per token. Besides the paper's DSSD per ε (every head, cap --max-draft), the table shows
`dssd_tuned` and `layerskip_nobonus` (the tuned LayerSkip without the bonus token: the paper author's baseline). With --model-dir and a
tokenizer, prompts are windows of real text (--text, default: a standard-library module's source).

With --temperature T..., each model also gets one sampled table per temperature T > 0 (top-k / top-p from
--top-k / --top-p): the engine's greedy (ancestral sampling from the full model, the reference), early exit
and the paper's DSSD per ε, and LayerSkip (with and without bonus) tuned again at that temperature on the
tuning prompts (by layer-equivalents per token). DSSD and LayerSkip use speculative sampling (exact in
distribution: tests/test_sampling.py), so outputs are not compared token by token. Prompt i is drawn with a
generator seeded --seed + i, the same seed in every repeat, so the repeats time identical work.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import platform
import statistics
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline.engine import DSSD, EarlyExit, Engine, Greedy, LayerSkip, Sampling
from pipeline.evaluation.decoding_harness import (
    DecodingPlan,
    ExternalMethod,
    hf_greedy,
    prompt_windows,
    run_decoding,
)
from pipeline.evaluation.decoding_report import Setting
from pipeline.evaluation.decoding_sampled import run_sampled
from pipeline.evaluation.decoding_tuning import layerskip_grid, select_layerskip
from pipeline.evaluation.stage_outputs import StageOutputs, latest_outputs
from pipeline.exits.calibration import calibrate
from pipeline.exits.confidence import get_metric
from pipeline.exits.heads import EarlyExitHeads
from pipeline.exits.policy import ExitPolicy
from pipeline.exits.thresholds import ExitThresholds
from pipeline.models.backbone import default_head_layers, load_backbone, num_layers_of
from pipeline.models.pythia_shapes import PYTHIA_SHAPES, pythia_config, random_pythia
from pipeline.orchestration.store import StageStore
from pipeline.stages.calibrate import DSSD_THRESHOLDS_FILE, THRESHOLDS_FILE, load_calibration

SHAPES = ("tiny", *PYTHIA_SHAPES)  # Pythia's real shapes (random weights), plus a tiny one
DEFAULT_EPS = (0.6, 0.8, 0.9, 0.95)


def random_model(shape: str, seed: int = 0) -> torch.nn.Module:
    if shape in PYTHIA_SHAPES:
        return random_pythia(shape, seed)
    from transformers import GPTNeoXForCausalLM

    # Pythia's architecture at a size that decodes in milliseconds: 4 blocks, d_model 64, 256 tokens.
    config = pythia_config("pythia-70m", vocab_size=256)
    config.update(
        {"num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 256}
    )
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(config).eval().requires_grad_(False)


def random_prompts(vocab: int, n: int, length: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=gen) for _ in range(n)]


def text_prompts(tokenizer, text: str, n: int, length: int, offset: int = 0) -> list[torch.Tensor]:
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    stride = max(length, (len(ids) - length) // max(n + offset, 1))
    starts = [i * stride for i in range(offset, offset + n) if i * stride + length <= len(ids)]
    if len(starts) < n:
        raise SystemExit(
            f"the prompt text has {len(ids)} tokens: too short for {n + offset} prompts of {length}"
        )
    return [ids[s : s + length] for s in starts]


def _default_text() -> str:
    return inspect.getsource(textwrap)


# -- on-the-fly calibration (models without a calibrate stage output) ----------------------------------------


@torch.inference_mode()
def head_metrics_on_greedy(
    engine: Engine, prompts: Sequence[torch.Tensor], new_tokens: int, metric: str = "entropy"
) -> tuple[np.ndarray, np.ndarray]:
    """Per generated token and head: the metric value and whether the head's argmax is the full model's."""
    fn = get_metric(metric)
    values, correct = [], []
    for prompt in prompts:
        tokens = engine.generate(prompt, Greedy(), new_tokens).tokens
        seq = torch.cat([prompt, torch.tensor(tokens, dtype=torch.long)]).view(1, -1)
        out = engine.model(seq, output_hidden_states=True)
        rows = slice(prompt.numel() - 1, seq.shape[1] - 1)
        full = out.logits[0, rows].argmax(-1)
        per_head_v, per_head_c, prev = [], [], out.hidden_states[0][0, rows]
        for k, layer in enumerate(engine.head_layers):
            hidden = out.hidden_states[layer + 1][0, rows]
            logits = engine.heads(k, hidden)
            per_head_v.append(fn(logits, hidden, prev) if fn.needs_hidden else fn(logits))
            per_head_c.append(logits.argmax(-1) == full)
            prev = hidden
        values.append(torch.stack(per_head_v, 1))
        correct.append(torch.stack(per_head_c, 1))
    return torch.cat(values).float().numpy(), torch.cat(correct).numpy()


def calibrate_on_the_fly(
    engine: Engine, prompts, new_tokens: int, eps: Sequence[float], metric: str = "entropy"
) -> dict[float, ExitPolicy]:
    """Empirical thresholds per ε from the heads' metric values on greedy generations of `prompts`."""
    values, correct = head_metrics_on_greedy(engine, prompts, new_tokens, metric)
    table = calibrate(values, correct, metric, eps, methods=["empirical"], layers=engine.head_layers)
    return {e: table.for_eps("empirical", e) for e in eps}


# -- what to benchmark ---------------------------------------------------------------------------------------


@dataclass
class Target:
    """One model to benchmark: its heads, exit policies per ε (None: calibrate on the fly) and prompts."""

    label: str
    model: torch.nn.Module
    heads: EarlyExitHeads
    policies: dict[float, ExitPolicy] | None
    prompts: list[torch.Tensor]
    tune_prompts: list[torch.Tensor]
    # The improved DSSD's thresholds (its signal's, with exit sets and per-draft accuracy: dssd_thresholds.json,
    # or thresholds.json where one signal serves both; pipeline/stages/calibrate.py).
    thresholds: ExitThresholds | None = None


def logit_lens_heads(model: torch.nn.Module) -> EarlyExitHeads:
    """Heads at the default blocks, each the model's own final norm + unembedding."""
    layers = default_head_layers(num_layers_of(model))
    return EarlyExitHeads.from_backbone(model, layers, init="unembedding")


def load_policies(path: Path, method: str, eps: Sequence[float]) -> dict[float, ExitPolicy]:
    """The exit policies of the requested ε that `path` (a thresholds file) calibrates."""
    table = ExitThresholds.load(path)
    calibrated = [e for e in eps if any(abs(e - c) < 1e-9 for c in table.eps)]
    if not calibrated:
        raise SystemExit(f"none of --eps {list(eps)} is calibrated in {path} (ε: {table.eps})")
    return {e: table.for_eps(method, e) for e in calibrated}


def shape_targets(args: argparse.Namespace) -> list[Target]:
    targets = []
    for shape in args.shapes:
        model = random_model(shape)
        vocab = model.get_output_embeddings().out_features
        prompts = random_prompts(vocab, args.n_prompts, args.prompt_len, seed=1)
        tune = random_prompts(vocab, args.n_tune_prompts, args.prompt_len, seed=2)
        targets.append(
            Target(f"{shape} (random weights)", model, logit_lens_heads(model), None, prompts, tune)
        )
    return targets


def model_dir_target(args: argparse.Namespace) -> Target:
    model, tokenizer = load_backbone(args.model_dir)
    heads = EarlyExitHeads.load(args.heads_dir, model) if args.heads_dir else logit_lens_heads(model)
    policies = load_policies(args.thresholds, args.method, args.eps) if args.thresholds else None
    text = args.text.read_text() if args.text else _default_text()
    prompts = text_prompts(tokenizer, text, args.n_prompts, args.prompt_len)
    tune = text_prompts(tokenizer, text, args.n_tune_prompts, args.prompt_len, offset=args.n_prompts)
    dssd_path = args.dssd_thresholds or args.thresholds
    if (
        args.thresholds
        and not args.dssd_thresholds
        and (args.thresholds.parent / DSSD_THRESHOLDS_FILE).is_file()
    ):
        dssd_path = args.thresholds.parent / DSSD_THRESHOLDS_FILE  # the calibrate stage's pair
    table = ExitThresholds.load(dssd_path) if dssd_path else None
    return Target(str(args.model_dir), model, heads, policies, prompts, tune, table)


def find_pipeline_outputs(root: Path, model: str = "tiny") -> StageOutputs:
    """The latest finished calibrate entry for `model` in the stage store under `root`/cache, with the entries
    it was computed from, checked against their completion records."""
    outputs = latest_outputs(StageStore(Path(root) / "cache"), model)
    if outputs is None:
        raise SystemExit(
            f"no finished backbone + heads outputs for model {model!r} under {Path(root) / 'cache'}: run the "
            "pipeline first (`python -m pipeline`), pass --model-dir/--heads-dir/--thresholds, or use "
            "random-weight models (--shapes tiny pythia-70m)"
        )
    outputs.verify()
    return outputs


def pipeline_target(args: argparse.Namespace) -> Target:
    from pipeline.data.tokens import make_text_source
    from pipeline.models.backbone import load_from_stage_output

    outputs = find_pipeline_outputs(args.from_outputs, args.model)
    model, tokenizer = load_from_stage_output(outputs.entry("backbone"))
    heads = EarlyExitHeads.load(outputs.entry("heads"), model)
    calibrated = outputs.entry("calibrate")
    policies = load_policies(calibrated / THRESHOLDS_FILE, args.method, args.eps) if calibrated else None
    print(
        f"# pipeline outputs: backbone {outputs.entry('backbone')}, heads {outputs.entry('heads')}, "
        f"thresholds {calibrated or 'calibrated on the fly'}"
    )
    try:
        source = make_text_source(outputs.record("extract")["config"]["data"])
        test, tune = prompt_windows(source, tokenizer, args.n_prompts, args.n_tune_prompts, args.prompt_len)
        prompts, tune_prompts = list(test), list(tune)
    except (KeyError, ValueError, OSError) as err:  # no extract entry, or a hub corpus not reachable now
        print(f"# prompts from the pipeline's data unavailable ({err!r}); using standard-library text")
        text = _default_text()
        prompts = text_prompts(tokenizer, text, args.n_prompts, args.prompt_len)
        tune_prompts = text_prompts(
            tokenizer, text, args.n_tune_prompts, args.prompt_len, offset=args.n_prompts
        )
    table = load_calibration(calibrated).dssd if calibrated else None
    return Target(f"{args.model} (pipeline outputs)", model, heads, policies, prompts, tune_prompts, table)


def targets_from_args(args: argparse.Namespace) -> list[Target]:
    if args.shapes:
        return shape_targets(args)
    if args.model_dir:
        return [model_dir_target(args)]
    return [pipeline_target(args)]


# -- running -------------------------------------------------------------------------------------------------


def plan_from_args(
    args: argparse.Namespace,
    policies: dict[float, Any],
    fills: Sequence[str],
    oracle: bool = True,
    external=None,
    thresholds: ExitThresholds | None = None,
) -> DecodingPlan:
    """The harness's plan; `thresholds` are the improved DSSD's (its signal's policies, and with its choices
    — exit sets, per-draft accuracy — also the `dssd` rows and γ in the tuning grid)."""
    accuracy = thresholds.draft_accuracy if thresholds is not None else None
    exit_sets = (
        {e: thresholds.exit_set(args.method, e) for e in policies}
        if thresholds is not None and thresholds.exit_sets
        else {}
    )
    return DecodingPlan(
        max_new_tokens=args.new_tokens,
        policies=policies,
        layerskip_d=args.layerskip_d,
        max_draft=args.max_draft,
        dssd_max_draft=args.dssd_max_draft,
        dssd_gamma=args.dssd_gamma if accuracy is not None else [0.0],
        exit_sets=exit_sets,
        draft_accuracy=accuracy,
        dssd_policies={e: thresholds.for_eps(args.method, e) for e in policies} if thresholds else {},
        layerskip_select=args.select,
        early_exit_fills=fills,
        repeats=args.repeats,
        warmup=args.warmup,
        oracle=oracle,
        external=external,
    )


def benchmark_target(target: Target, args: argparse.Namespace) -> list[pd.DataFrame]:
    """The greedy speed table, then one sampled table per --temperature."""
    model, heads = target.model.eval().requires_grad_(False), target.heads.eval()
    engine = Engine(model, heads)
    policies = target.policies
    if policies is None:
        policies = calibrate_on_the_fly(engine, target.tune_prompts, args.new_tokens, args.eps)
    plan = plan_from_args(args, policies, args.fills, thresholds=target.thresholds)
    report = run_decoding(engine, model, target.prompts, target.tune_prompts, plan)
    frames = [report.speed_table(target.label)]
    for temperature in args.temperature:
        frames.append(sampled_table(engine, target, policies, args, temperature, plan))
    return frames


# -- sampling (--temperature) ---------------------------------------------------------------------------------


def sampled_table(
    engine: Engine,
    target: Target,
    policies: dict[float, ExitPolicy],
    args,
    temperature: float,
    plan: DecodingPlan,
) -> pd.DataFrame:
    """One line per method at `temperature` (module docstring), LayerSkip tuned at that temperature. Each run
    goes through the decoding stage's `run_sampled` (prompt i draws from a generator seeded `--seed` + i)."""
    sampling = Sampling(temperature, args.top_k, args.top_p)
    grid = layerskip_grid(len(engine.head_layers), args.layerskip_d)
    for i, prompt in enumerate(target.tune_prompts):
        for setting in grid:
            run_sampled(engine, setting, prompt, "tune", i, sampling, args.seed, plan)
    best = select_layerskip(grid)
    greedy = Setting("greedy", strategy=Greedy())
    settings = [
        greedy,
        *[Setting("early_exit", eps=e, strategy=EarlyExit(p)) for e, p in policies.items()],
        Setting("layerskip", head=best.head, draft_len=best.draft_len, strategy=best.strategy),
        Setting(
            "layerskip_nobonus",
            head=best.head,
            draft_len=best.draft_len,
            strategy=LayerSkip(best.head, best.draft_len, bonus=False),
        ),
        *[
            Setting("dssd_paper", eps=e, strategy=DSSD(p, max_draft=args.max_draft))
            for e, p in policies.items()
        ],
    ]
    for i, prompt in enumerate(target.prompts):  # interleaved per prompt, as in the greedy benchmark
        for setting in settings:
            run_sampled(engine, setting, prompt, "test", i, sampling, args.seed, plan)
    lines = []
    for setting in settings:
        speeds = setting.tokens_per_s_by_repeat()
        ratios = [s / g for s, g in zip(speeds, greedy.tokens_per_s_by_repeat(), strict=True)]
        summary = setting.summary()
        lines.append(
            {
                "model": target.label,
                **sampling.describe(),
                "method": setting.method,
                "setting": setting.detail or "engine",
                "tokens_per_s": statistics.median(speeds),
                "ratio_vs_greedy": statistics.median(ratios),
                "layer_eq_per_token": summary["layer_equiv_per_token"],
                "latency_eq_per_token": summary["latency_equiv_per_token"],
                "acceptance_rate": summary.get("acceptance_rate", math.nan),
                "accepted_per_verification": summary.get("accepted_per_verification", math.nan),
            }
        )
    return pd.DataFrame(lines)


# -- Llama: transformers' assistant_early_exit next to our LayerSkip -----------------------------------------

LLAMA_SHAPES = {  # (layers, d_model, attention heads, KV heads, vocab)
    "llama-tiny": (8, 256, 8, 4, 4096),
    "llama-small": (16, 512, 8, 4, 32000),
}


def random_llama(shape: str = "llama-tiny", embed_scale: float = 10.0, seed: int = 0) -> torch.nn.Module:
    """A random-weight LlamaForCausalLM (GQA, untied LM head) whose token embeddings are scaled by
    `embed_scale`, so that early exits often agree with the full model (see the module docstring)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, d_model, n_heads, n_kv, vocab = LLAMA_SHAPES[shape]
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=d_model,
        intermediate_size=int(2.6875 * d_model) // 16 * 16,
        num_hidden_layers=layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        initializer_range=0.02,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    model.model.embed_tokens.weight.mul_(embed_scale)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def assistant_methods(model: torch.nn.Module, head_layers: Sequence[int], new_tokens: int):
    """transformers' assistant_early_exit with the tuned LayerSkip's exit block and draft length (constant
    schedule), and with its default schedule."""

    def build(tuned: Setting) -> list[ExternalMethod]:
        # transformers counts the drafter's blocks: block k-1's output is our head at block k-1.
        k, d = head_layers[tuned.head] + 1, tuned.draft_len

        def constant(prompt: torch.Tensor) -> list[int]:
            return hf_greedy(
                model,
                prompt,
                new_tokens,
                assistant_early_exit=k,
                num_assistant_tokens=d,
                num_assistant_tokens_schedule="constant",
            )

        def default(prompt: torch.Tensor) -> list[int]:
            return hf_greedy(model, prompt, new_tokens, assistant_early_exit=k)

        return [
            ExternalMethod("assistant_early_exit", f"transformers k={k} d={d} (constant)", constant),
            ExternalMethod("assistant_early_exit", f"transformers k={k} (default schedule)", default),
        ]

    return build


def llama_assistant_benchmark(shape: str, args: argparse.Namespace) -> pd.DataFrame:
    """Our LayerSkip (tuned head and d) vs transformers' assistant_early_exit with the same exit block and
    draft length, plus `generate` and our greedy, on one random Llama model and the same prompts."""
    model = random_llama(shape, args.llama_embed_scale)
    vocab = model.get_output_embeddings().out_features
    prompts = random_prompts(vocab, args.n_prompts, args.prompt_len, seed=1)
    tune = random_prompts(vocab, args.n_tune_prompts, args.prompt_len, seed=2)
    heads = logit_lens_heads(model).eval()  # final norm + LM head: what transformers drafts with
    engine = Engine(model, heads)
    external = assistant_methods(model, engine.head_layers, args.new_tokens)
    plan = plan_from_args(args, {}, (), oracle=False, external=external)
    report = run_decoding(engine, model, prompts, tune, plan)
    return report.speed_table(f"{shape} (random weights, embeddings ×{args.llama_embed_scale:g})")


# -- main ----------------------------------------------------------------------------------------------------

GPT_NEOX_NOTE = (
    "note: transformers' assistant_early_exit is shown only for Llama: on GPT-NeoX (Pythia) it "
    "silently runs the full model (its layer loop ignores num_hidden_layers; docs/design.md §6)."
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--from-outputs",
        type=Path,
        default=Path("outputs"),
        help="pipeline outputs root: latest finished backbone/heads/calibrate (default: outputs)",
    )
    parser.add_argument("--model", default="tiny", help="model name under <outputs>/cache (default: tiny)")
    parser.add_argument(
        "--shapes",
        nargs="+",
        choices=list(SHAPES),
        help="random-weight models of these shapes instead of the pipeline's outputs",
    )
    parser.add_argument("--model-dir", type=Path, help="a saved model (overrides --from-outputs)")
    parser.add_argument("--heads-dir", type=Path, help="trained heads for --model-dir (default: logit lens)")
    parser.add_argument("--thresholds", type=Path, help="thresholds file from the calibrate stage")
    parser.add_argument(
        "--dssd-thresholds",
        type=Path,
        help="the improved DSSD's thresholds (default: dssd_thresholds.json next to --thresholds if there, "
        "else --thresholds)",
    )
    parser.add_argument("--method", default="empirical", help="calibration method in the thresholds file")
    parser.add_argument("--eps", type=float, nargs="+", default=list(DEFAULT_EPS))
    parser.add_argument(
        "--text", type=Path, help="text for prompts with --model-dir (default: stdlib source)"
    )
    parser.add_argument("--n-prompts", type=int, default=8)
    parser.add_argument("--n-tune-prompts", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--max-draft", type=int, default=16, help="the paper's DSSD rows: draft cap")
    parser.add_argument(
        "--dssd-max-draft",
        type=int,
        nargs="+",
        default=[1, 2, 4, 16],
        help="dssd_tuned: draft caps its grid (ε × consulted heads × cap) tunes over on the tuning prompts",
    )
    parser.add_argument(
        "--dssd-gamma",
        type=float,
        nargs="+",
        default=[0.0, 0.5],
        help="dssd_tuned: adaptive-stop γ values its grid also tunes over (needs the calibrate stage's thresholds)",
    )
    parser.add_argument(
        "--select",
        default="layer_equiv_per_token",
        choices=["layer_equiv_per_token", "latency_equiv_per_token", "tokens_per_s"],
        help="how LayerSkip's (head, d) and dssd_tuned are chosen on the tuning prompts (the same for both)",
    )
    parser.add_argument("--layerskip-d", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8])
    parser.add_argument("--fills", nargs="+", default=["lazy"], choices=["lazy", "copy", "recompute"])
    parser.add_argument(
        "--temperature",
        type=float,
        nargs="+",
        default=[],
        help="also benchmark sampling at these temperatures (> 0; the greedy table is always shown)",
    )
    parser.add_argument("--top-k", type=int, default=0, help="top-k of --temperature sampling (0: off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="top-p of --temperature sampling (1: off)")
    parser.add_argument("--seed", type=int, default=0, help="prompt i samples with seed --seed + i")
    parser.add_argument(
        "--llama",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also benchmark transformers' assistant_early_exit vs our LayerSkip on a random Llama",
    )
    parser.add_argument("--llama-shape", choices=list(LLAMA_SHAPES), default="llama-tiny")
    parser.add_argument("--llama-embed-scale", type=float, default=10.0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1 is stable on a shared machine; ratios are per setting)",
    )
    parser.add_argument("--csv", type=Path, default=Path("outputs/benchmarks/decoding_speed.csv"))
    args = parser.parse_args(argv)
    for temperature in args.temperature:
        try:  # invalid sampling values fail here, before any model is loaded
            Sampling(temperature, args.top_k, args.top_p)
        except ValueError as err:
            parser.error(f"--temperature {temperature:g} / --top-k / --top-p: {err}")
    return args


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    frames = []
    for target in targets_from_args(args):
        for frame in benchmark_target(target, args):
            frames.append(frame)
            _print(frame, target.label, args)
    if args.llama:
        frame = llama_assistant_benchmark(args.llama_shape, args)
        frames.append(frame)
        _print(frame, frame["model"].iloc[0], args)
        print(GPT_NEOX_NOTE)
    result = pd.concat(frames, ignore_index=True)
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    result.to_csv(args.csv, index=False)
    return result


def _print(frame: pd.DataFrame, label: str, args) -> None:
    machine = {
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "prompts": args.n_prompts,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
    }
    sampled = f", sampling T={frame['temperature'].iloc[0]:g}" if "temperature" in frame else ""
    print(f"\n# decoding speed on {label}{sampled}; {json.dumps(machine)}")
    shown = frame.drop(columns=["model"]).dropna(axis=1, how="all")
    try:
        print(shown.to_markdown(index=False, floatfmt=".3g"))
    except ImportError:  # tabulate is optional
        print(shown.to_string(index=False, float_format=lambda x: f"{x:.3g}"))


if __name__ == "__main__":
    main()
