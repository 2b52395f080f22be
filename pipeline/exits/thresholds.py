"""The exit-threshold artifact: one threshold per head per calibration method and target accuracy ε.

`ExitThresholds` is what the calibrate stage writes (`thresholds.json`) and what every consumer reads: the
decoding stage, the lm-eval stage, benchmarks and users outside the pipeline. `for_eps(method, ε)` turns one
row of it into the exit policy (`pipeline.exits.policy.ExitPolicy`). How the thresholds are found lives in
`pipeline.exits.calibration`; this module owns only their meaning, validation and file format.

File format (JSON, `format` = "dssd-exit-thresholds", `version` = 1): `metric` and its `direction` ("lower"
or "higher" is confident), the head `layers`, the calibrated `eps` as stable strings (`eps_key`), `delta`,
`cascade`, `n_calibration`, the calibration `settings`, and `thresholds[method][eps_key(ε)][head]` on the
metric's own scale, `null` meaning "this head never exits at this ε". A pruned signal's artifact (metric
`<metric>@top<K>`) also holds its `candidates` (`vocab_size`, `source`, `token_ids`): decoding evaluates
heads over exactly the tokens the thresholds were calibrated on.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.exits.confidence import ConfidenceMetric, get_metric
from pipeline.exits.draft_stop import DraftAccuracy
from pipeline.exits.exit_set import ExitSetChoice
from pipeline.exits.policy import ExitPolicy
from pipeline.exits.vocab_pruning import CandidateSet
from pipeline.orchestration.validation import check_eps as check_eps_config

# The calibration methods an artifact may hold (both implemented in pipeline.exits.calibration).
METHODS = ("empirical", "ltt")
FORMAT = "dssd-exit-thresholds"
FORMAT_VERSION = 1


# --- validation and keys -------------------------------------------------------------------------------------


def check_eps(eps: float | Sequence[float]) -> list[float]:
    """Validate target accuracies: each must lie in (0, 1] (one implementation, shared with config checks)."""
    return check_eps_config(eps, "ε grid")


def check_delta(delta: float) -> float:
    """Validate the LTT risk level δ: it must lie in (0, 1)."""
    if not isinstance(delta, numbers.Real) or isinstance(delta, bool) or not 0.0 < float(delta) < 1.0:
        raise ValueError(
            f"δ={delta!r} is not a valid error level: δ is the probability that a guaranteed threshold misses ε "
            "and must lie in (0, 1) (e.g. 0.05)"
        )
    return float(delta)


def eps_key(eps: float | str) -> str:
    """Stable string form of ε for JSON keys: at least two decimals, no float noise ("0.90", "0.995", "1.00")."""
    value = float(eps)
    text = f"{value:.6f}".rstrip("0")
    decimals = len(text.split(".")[1])
    return text + "0" * max(0, 2 - decimals)


# --- the artifact ---------------------------------------------------------------------------------------------


@dataclass
class ExitThresholds:
    """thresholds[method][eps_key(ε)][head] on the metric's own scale; None = the head never exits."""

    metric: str
    lower_is_confident: bool
    layers: list[int]
    eps: list[float]
    delta: float
    cascade: bool
    thresholds: dict[str, dict[str, list[float | None]]]
    n_calibration: int = 0
    settings: dict = field(default_factory=dict)
    candidates: CandidateSet | None = None  # the candidate set of a pruned signal
    # DSSD beyond the paper (calibrate stage): per-draft accuracy per head (adaptive draft length) and, per
    # method and ε key, the heads DSSD consults, its γ and draft cap (pipeline/exits/exit_set.py).
    draft_accuracy: DraftAccuracy | None = None
    exit_sets: dict[str, dict[str, ExitSetChoice]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        metric = get_metric(self.metric)
        if metric.candidates != (None if self.candidates is None else self.candidates.k):
            raise ValueError(
                f"metric {self.metric!r} and the stored candidate set "
                f"({'none' if self.candidates is None else f'{self.candidates.k} tokens'}) disagree"
            )
        if metric.lower_is_confident != self.lower_is_confident:
            raise ValueError(
                f"direction mismatch for metric {self.metric!r}: the registry says "
                f"lower_is_confident={metric.lower_is_confident}"
            )
        self.eps = check_eps(self.eps)
        self.delta = check_delta(self.delta)
        expected = {eps_key(e) for e in self.eps}
        for method, by_eps in self.thresholds.items():
            if method not in METHODS:
                raise ValueError(f"unknown calibration method {method!r} in thresholds; known: {METHODS}")
            if set(by_eps) != expected:
                raise ValueError(
                    f"thresholds[{method!r}] has ε keys {sorted(by_eps)}, expected {sorted(expected)}"
                )
            for key, row in by_eps.items():
                if len(row) != len(self.layers):
                    raise ValueError(
                        f"thresholds[{method!r}][{key!r}] has {len(row)} entries for {len(self.layers)} heads"
                    )
                for t in row:
                    if t is not None and (
                        isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t)
                    ):
                        raise ValueError(
                            f"thresholds[{method!r}][{key!r}] holds {t!r}: expected a finite number or null"
                        )
        self._check_exit_sets()

    def _check_exit_sets(self) -> None:
        for method, by_eps in self.exit_sets.items():
            if method not in self.thresholds or set(by_eps) != set(self.thresholds[method]):
                raise ValueError(
                    f"exit_sets[{method!r}] has ε keys {sorted(by_eps)}; expected those of its thresholds"
                )
            for key, choice in by_eps.items():
                if any(not 0 <= k < len(self.layers) for k in choice.heads):
                    raise ValueError(f"exit_sets[{method!r}][{key!r}] names heads {list(choice.heads)}")
        if self.draft_accuracy is not None and (
            self.draft_accuracy.n_heads != len(self.layers) or self.draft_accuracy.metric != self.metric
        ):
            raise ValueError(
                f"draft_accuracy is for {self.draft_accuracy.n_heads} heads of {self.draft_accuracy.metric!r}, "
                f"the thresholds for {len(self.layers)} heads of {self.metric!r}"
            )

    def exit_set(self, method: str, eps: float | str) -> ExitSetChoice:
        """DSSD's stored choice at one (method, ε): consulted heads, γ, draft cap."""
        key = eps_key(eps)
        if key not in self.exit_sets.get(method, {}):
            raise KeyError(
                f"no DSSD exit set for {method!r} at ε={key} in these {self.metric} thresholds: the improved "
                "DSSD's choices live with its own signal's thresholds (dssd_thresholds.json where "
                "calibrate.dssd.metric differs from calibrate.metric: pipeline.stages.calibrate."
                "load_calibration(entry).dssd), or the file predates exit sets: rerun the calibrate stage"
            )
        return self.exit_sets[method][key]

    @property
    def methods(self) -> list[str]:
        return list(self.thresholds)

    @property
    def metric_fn(self) -> ConfidenceMetric:
        return get_metric(self.metric)

    def for_eps(self, method: str, eps: float | str) -> ExitPolicy:
        """The exit policy of one (method, ε): these heads, their thresholds at ε, this metric."""
        return ExitPolicy(tuple(self.layers), tuple(self._row(method, eps)), self.metric, self.candidates)

    def _row(self, method: str, eps: float | str) -> list[float | None]:
        if method not in self.thresholds:
            raise KeyError(f"no thresholds for method {method!r}; available: {self.methods}")
        key = eps_key(eps)
        if key not in self.thresholds[method]:
            raise KeyError(f"no thresholds for ε={key}; calibrated: {[eps_key(e) for e in self.eps]}")
        return list(self.thresholds[method][key])

    def to_dict(self) -> dict:
        out = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "metric": self.metric,
            "direction": "lower" if self.lower_is_confident else "higher",
            "layers": self.layers,
            "eps": [eps_key(e) for e in self.eps],
            "delta": self.delta,
            "cascade": self.cascade,
            "n_calibration": self.n_calibration,
            "settings": self.settings,
            "thresholds": self.thresholds,
        }
        if self.candidates is not None:
            out["candidates"] = self.candidates.to_dict()
        if self.draft_accuracy is not None:
            out["draft_accuracy"] = self.draft_accuracy.to_dict()
        if self.exit_sets:
            out["exit_sets"] = {
                m: {key: choice.to_dict() for key, choice in by_eps.items()}
                for m, by_eps in self.exit_sets.items()
            }
        return out

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_dict(cls, data: dict) -> ExitThresholds:
        if data.get("format") != FORMAT or data.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"not a thresholds file of format {FORMAT!r} v{FORMAT_VERSION} "
                f"(found {data.get('format')!r} v{data.get('version')!r})"
            )
        if data.get("direction") not in ("lower", "higher"):
            raise ValueError(f"direction must be 'lower' or 'higher', got {data.get('direction')!r}")
        return cls(
            metric=data["metric"],
            lower_is_confident=data["direction"] == "lower",
            layers=[int(x) for x in data["layers"]],
            eps=[float(e) for e in data["eps"]],
            delta=data["delta"],
            cascade=bool(data["cascade"]),
            thresholds=data["thresholds"],
            n_calibration=int(data.get("n_calibration", 0)),
            settings=dict(data.get("settings", {})),
            candidates=CandidateSet.from_dict(data["candidates"]) if data.get("candidates") else None,
            draft_accuracy=DraftAccuracy.from_dict(data["draft_accuracy"])
            if data.get("draft_accuracy")
            else None,
            exit_sets={
                m: {key: ExitSetChoice.from_dict(c) for key, c in by_eps.items()}
                for m, by_eps in data.get("exit_sets", {}).items()
            },
        )

    @classmethod
    def load(cls, path: str | Path) -> ExitThresholds:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no thresholds file at {path}; run the calibrate stage first")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"thresholds file {path} is not valid JSON: {err}") from err
        try:
            return cls.from_dict(data)
        except KeyError as err:
            raise ValueError(f"thresholds file {path} lacks field {err}") from err
