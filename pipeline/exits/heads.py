"""Early-exit heads: the modules, and their artifact on disk (safetensors weights + JSON spec).

A head reads the residual stream after block `layer` (0-based) and predicts the next token:
`linear` = copy of the backbone's final norm + Linear(d_model, vocab, bias=False) (the paper author's form);
`mlp` = a small residual MLP in front of that. The logit lens is a `linear` head initialised from the
backbone's own unembedding and never trained.

Heads are saved with the fingerprint of the backbone they were trained on; loading them onto another
backbone fails (`HeadsMismatchError`), because their logits would be silently meaningless.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.models.backbone import backbone_fingerprint, final_norm_of, num_layers_of, unembedding_of

WEIGHTS_FILE = "heads.safetensors"
SPEC_FILE = "heads.json"
HEAD_TYPES = ("linear", "mlp")
INITS = ("unembedding", "random")


class HeadsMismatchError(ValueError):
    """Heads were trained for another backbone (fingerprint or shape differs)."""


@dataclass
class HeadsSpec:
    """Everything needed to rebuild the heads and to check they fit a backbone."""

    head_type: str
    layers: list[int]
    d_model: int
    vocab_size: int
    init: str = "unembedding"
    mlp_ratio: float = 1.0
    backbone_id: str = ""
    backbone_revision: str | None = None
    fingerprint: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.head_type not in HEAD_TYPES:
            raise ValueError(f"unknown head type {self.head_type!r}; choose one of {HEAD_TYPES}")
        if self.init not in INITS:
            raise ValueError(f"unknown head init {self.init!r}; choose one of {INITS}")
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"head layers must be strictly increasing, got {self.layers}")


class ExitHead(nn.Module):
    """norm -> (optional residual MLP before it) -> vocab projection."""

    def __init__(
        self, norm: nn.Module, d_model: int, vocab_size: int, head_type: str, mlp_ratio: float = 1.0
    ):
        super().__init__()
        self.mlp: nn.Module | None = None
        if head_type == "mlp":
            hidden = max(1, int(round(d_model * mlp_ratio)))
            self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, d_model))
            # Zero the output layer so an MLP head starts exactly as the linear head it extends.
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)
        self.norm = norm
        self.proj = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.mlp is not None:
            hidden = hidden + self.mlp(hidden)
        return self.proj(self.norm(hidden))


class EarlyExitHeads(nn.Module):
    """One `ExitHead` per configured block index; `heads(i, hidden)` gives head i's logits."""

    def __init__(self, spec: HeadsSpec, norm_template: nn.Module):
        super().__init__()
        self.spec = spec
        self.layers: list[int] = list(spec.layers)
        self.heads = nn.ModuleList(
            ExitHead(
                copy.deepcopy(norm_template), spec.d_model, spec.vocab_size, spec.head_type, spec.mlp_ratio
            )
            for _ in self.layers
        )

    def __len__(self) -> int:
        return len(self.layers)

    def forward(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.heads[index](hidden)

    # -- construction ------------------------------------------------------------------------------------------

    @classmethod
    def from_backbone(
        cls,
        model: nn.Module,
        layers: list[int],
        head_type: str = "linear",
        init: str = "unembedding",
        mlp_ratio: float = 1.0,
        backbone_id: str = "",
        backbone_revision: str | None = None,
        seed: int | None = None,
    ) -> EarlyExitHeads:
        """Fresh heads for `model`: norms copied from its final norm; projection copied or random."""
        n_layers = num_layers_of(model)
        bad = [layer for layer in layers if not 0 <= layer < n_layers]
        if bad:
            raise ValueError(f"head layers {bad} out of range: the backbone has blocks 0..{n_layers - 1}")
        unembed = unembedding_of(model)
        spec = HeadsSpec(
            head_type=head_type,
            layers=[int(x) for x in layers],
            d_model=unembed.in_features,
            vocab_size=unembed.out_features,
            init=init,
            mlp_ratio=mlp_ratio,
            backbone_id=backbone_id,
            backbone_revision=backbone_revision,
            fingerprint=backbone_fingerprint(model),
        )
        if seed is not None:
            torch.manual_seed(seed)
        heads = cls(spec, final_norm_of(model))
        with torch.no_grad():
            for head in heads.heads:
                if init == "unembedding":
                    head.proj.weight.copy_(unembed.weight)
                else:
                    nn.init.normal_(head.proj.weight, std=unembed.in_features**-0.5)
        # The norms are deep copies of a frozen backbone's: make the new heads trainable.
        return heads.float().requires_grad_(True).train()

    # -- artifact ----------------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> dict[str, str]:
        """Write `heads.safetensors` + `heads.json`; return sha256 of both files."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE))
        (directory / SPEC_FILE).write_text(json.dumps(asdict(self.spec), indent=2))
        return {name: file_sha256(directory / name) for name in (WEIGHTS_FILE, SPEC_FILE)}

    @classmethod
    def load(
        cls, directory: str | Path, backbone: nn.Module, check_fingerprint: bool = True
    ) -> EarlyExitHeads:
        """Load heads saved by `save` onto `backbone`, refusing heads trained for another backbone."""
        directory = Path(directory)
        spec_path, weights_path = directory / SPEC_FILE, directory / WEIGHTS_FILE
        for path in (spec_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"heads file {path} is missing; rerun the heads stage (stages=[heads])"
                )
        spec = HeadsSpec(**json.loads(spec_path.read_text()))
        unembed = unembedding_of(backbone)
        if (spec.d_model, spec.vocab_size) != (unembed.in_features, unembed.out_features):
            raise HeadsMismatchError(
                f"heads in {directory} are for d_model={spec.d_model}, vocab={spec.vocab_size}, but the backbone "
                f"has d_model={unembed.in_features}, vocab={unembed.out_features}: wrong heads file for this model"
            )
        if check_fingerprint:
            actual = backbone_fingerprint(backbone)
            if spec.fingerprint != actual:
                raise HeadsMismatchError(
                    f"heads in {directory} were trained on backbone {spec.backbone_id or '?'} "
                    f"(fingerprint {spec.fingerprint}), not on this one (fingerprint {actual}). "
                    "Train heads for this model (stages=[heads]) or load the matching backbone."
                )
        n_layers = num_layers_of(backbone)
        if any(layer >= n_layers for layer in spec.layers):
            raise HeadsMismatchError(f"heads layers {spec.layers} exceed the backbone's {n_layers} blocks")
        heads = cls(spec, final_norm_of(backbone)).float()
        heads.load_state_dict(load_file(str(weights_path)))
        heads.eval()
        return heads


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
