"""The result rows of a decoding run, one function per kind of row (their meaning: decoding_report's docstring).

Row functions read a `Setting` (pipeline/evaluation/decoding_report.py) through its summary and counters;
counters are summed over prompts before any ratio is taken.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from pipeline.orchestration.results import row

if TYPE_CHECKING:
    from pipeline.evaluation.decoding_report import Setting

log = logging.getLogger(__name__)

METHOD_COLUMN = "setting"  # the results column that names a decoding row's method
# Methods that draft and verify: their rows carry acceptance and per-head draft fractions.
SPECULATIVE = (
    "layerskip",
    "layerskip_grid",
    "layerskip_nobonus",
    "dssd_paper",
    "dssd",
    "dssd_grid",
    "dssd_tuned",
    "dssd_perfect_gate",
)


# Sampled decoding (decoding.sampling, temperature T > 0) writes its rows under the method's name with this
# prefix (`sampled_dssd_paper`, ...) and the temperature in the `temperature` column, so that every reader
# selecting today's greedy settings by name keeps reading greedy rows only.
SAMPLED_PREFIX = "sampled_"


def decoding_row(metric: str, value: float, method: str, **labels: Any) -> dict[str, Any]:
    return row(metric, value, **{METHOD_COLUMN: method}, **labels)


def setting_rows(
    setting: Setting, generate_tps: float, reference: list[list[int]], **extra: Any
) -> list[dict]:
    """The rows of one setting; `reference` is `generate`'s tokens on the same prompts."""
    # `method` is _row's argument
    common = {"method": setting.method, "eps": setting.eps, **setting.labels, **extra}
    out = []
    summary = setting.summary()
    summary["speedup_vs_generate"] = summary["tokens_per_s"] / generate_tps if generate_tps > 0 else math.nan
    for metric, value in summary.items():
        if not (isinstance(value, float) and math.isnan(value)):
            out.append(decoding_row(metric, value, **common))
    if setting.method == "early_exit":
        same = sum(
            a == b
            for ref, toks in zip(reference, setting.tokens, strict=True)
            for a, b in zip(ref, toks, strict=False)
        )
        out.append(decoding_row("agreement", same / sum(map(len, reference)), **common))
        out += [
            decoding_row("exit_frac", f, head=k, **common)
            for k, f in enumerate(setting.per_head("exits_per_head"))
        ]
    else:
        # Lossless methods: the run would have raised on any mismatch, so this is 1 by the time rows exist,
        # unless a bf16/fp16 near-tie (counted: near_ties, here or on greedy's row) let a token differ.
        out.append(decoding_row("identical", float(setting.tokens == reference), **common))
        out.append(decoding_row("near_ties", float(setting.near_ties), **common))
    if setting.method in SPECULATIVE:
        out += [
            decoding_row("draft_frac", f, head=k, **common)
            for k, f in enumerate(setting.per_head("drafts_per_head"))
        ]
    return out


RATIOS = {  # row name: the summary metric compared, DSSD / tuned LayerSkip
    "acceptance_ratio": "acceptance_rate",
    "accepted_per_verification_ratio": "accepted_per_verification",
    "layer_equiv_ratio": "layer_equiv_per_token",
    "latency_equiv_ratio": "latency_equiv_per_token",
    "speed_ratio": "tokens_per_s",
}


def ratio_rows(dssd: list[Setting], layerskip: Setting) -> list[dict]:
    """One row per ratio and ε (NaN when undefined, e.g. DSSD drafted nothing at this ε); `dssd` are the
    paper-rule settings (the paper's comparison)."""
    out = []
    ls = layerskip.summary()
    for setting in dssd:
        ds = setting.summary()
        for name, key in RATIOS.items():
            a, b = ds.get(key, math.nan), ls.get(key, math.nan)
            out.append(
                decoding_row(name, a / b if b > 0 else math.nan, method="dssd_vs_layerskip", eps=setting.eps)
            )
        if not setting.total("drafted"):
            log.warning(
                "DSSD at ε=%g drafted nothing on the test prompts (no head is confident at this ε): it ran "
                "as greedy decoding; its acceptance ratios are undefined (NaN)",
                setting.eps,
            )
    return out


def oracle_speculation(earliest: list[int | None], max_draft: int) -> tuple[int, int]:
    """An oracle drafter under DSSD's rules: it drafts a token exactly when some head gets it right, stops
    at the first token no head gets right (that token comes from the verifying pass) or at `max_draft`
    drafts. Returns (accepted drafts, verifications). The first token (from the prompt's pass) is never
    drafted."""
    accepted = verifications = 0
    i, n = 1, len(earliest)
    while i < n:
        cap = min(max_draft, n - i - 1)
        run = 0
        while run < cap and earliest[i + run] is not None:
            run += 1
        if run:
            accepted += run
            verifications += 1
        i += run + 1
    return accepted, verifications


def oracle_rows(bounds: list[Any], max_draft: int, n_heads: int) -> list[dict]:
    """The oracle's rows from one `OracleBound` per prompt (none without bounds)."""
    if not bounds:
        return []
    n_tok = sum(len(b.oracle_cost) for b in bounds)
    accepted = verifications = 0
    per_head = [0] * n_heads
    for b in bounds:
        a, v = oracle_speculation(b.earliest_head, max_draft)
        accepted, verifications = accepted + a, verifications + v
        per_head = [x + y for x, y in zip(per_head, b.exits_per_head(), strict=True)]
    oracle_cost = sum(sum(b.oracle_cost) for b in bounds) / n_tok
    out = [
        decoding_row("layer_equiv_per_token", oracle_cost, method="oracle"),
        decoding_row("latency_equiv_per_token", oracle_cost, method="oracle"),  # every call is one row
        decoding_row(
            "cascade_layer_equiv_per_token", sum(sum(b.cascade_cost) for b in bounds) / n_tok, method="oracle"
        ),
        decoding_row("exit_frac", sum(per_head) / n_tok, method="oracle", head="all"),
        decoding_row("acceptance_rate", 1.0, method="oracle"),
        decoding_row("identical", 1.0, method="oracle"),
    ]
    out += [decoding_row("exit_frac", c / n_tok, method="oracle", head=k) for k, c in enumerate(per_head)]
    if verifications:
        out.append(decoding_row("accepted_per_verification", accepted / verifications, method="oracle"))
    return out


def dssd_choice_rows(setting: Setting, n_heads: int) -> list[dict]:
    """What a DSSD setting (`dssd` per ε, `dssd_tuned`) consults: its draft cap (`max_draft`), its adaptive
    stop (`min_chain_prob`, γ; 0 = none) and, per head, `consulted` (1 when the head may draft, 0 when its
    threshold is None); `dssd_tuned` also its ε (`tuned_eps`)."""
    strategy, common = setting.strategy, {"method": setting.method, "eps": setting.eps}
    enabled = set(strategy.policy.enabled)
    out = [decoding_row("tuned_eps", setting.eps, **common)] if setting.method == "dssd_tuned" else []
    out += [
        decoding_row("max_draft", strategy.max_draft, **common),
        decoding_row("min_chain_prob", strategy.min_chain_prob, **common),
    ]
    out += [decoding_row("consulted", float(k in enabled), **common, head=k) for k in range(n_heads)]
    return out


def sampled_rows(setting: Setting, temperature: float, greedy_tps: float, **extra: Any) -> list[dict]:
    """The rows of one setting decoded by sampling at `temperature`: setting `sampled_<method>`, column
    `temperature`; the summary metrics, `speedup_vs_greedy` (tokens/s over the sampled greedy's on the same
    prompts: ancestral sampling from the full model) and per-head draft fractions. No `identical` row:
    sampled outputs differ from one another by design; DSSD and LayerSkip are exact in distribution, which
    tests/test_sampling.py proves (chi-square), not a token-by-token check."""
    common = {"method": SAMPLED_PREFIX + setting.method, "eps": setting.eps, **setting.labels, **extra}
    common["temperature"] = temperature
    summary = setting.summary()
    summary["speedup_vs_greedy"] = summary["tokens_per_s"] / greedy_tps if greedy_tps > 0 else math.nan
    out = [
        decoding_row(metric, value, **common)
        for metric, value in summary.items()
        if not (isinstance(value, float) and math.isnan(value))
    ]
    if setting.method in SPECULATIVE:
        out += [
            decoding_row("draft_frac", f, head=k, **common)
            for k, f in enumerate(setting.per_head("drafts_per_head"))
        ]
    return out
