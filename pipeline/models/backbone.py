"""Loading the frozen backbone, and the few architecture facts the rest of the code needs.

Every model — a Pythia checkpoint on the hub, a local directory, or the offline tiny model the project
pretrains itself — goes through `load_backbone`, so the tiny model exercises exactly the Pythia path.
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import torch
from torch import nn

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class BackboneError(RuntimeError):
    """A model cannot be loaded; the message says why and what to do instead."""


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def host_reachable(host: str, timeout_s: float = 3.0) -> bool:
    """True when `host` answers a TCP connect on port 443; never hangs longer than `timeout_s`."""
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """True when the Hugging Face hub is reachable and not switched off by HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1":
        return False
    return host_reachable("huggingface.co", timeout_s)


def _hub_snapshot_cached(hub_id: str, revision: str | None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(hub_id, "config.json", revision=revision)
        return isinstance(found, str)
    except Exception:
        return False


def is_local_source(source: str | Path) -> bool:
    """A local model directory (written by `save_pretrained`), as opposed to a hub id or the tiny model."""
    return str(source) != "tiny" and Path(source).is_dir()


def source_revision(source: str | Path, revision: str | None) -> str | None:
    """The revision that identifies `source`: a hub model's pinned revision; None for a local directory
    (identified by its content, `local_model_fingerprint`) and for the tiny model (by its settings). A
    Pythia model config pins `step143000`, which says nothing about a directory it is pointed at."""
    if str(source) == "tiny" or is_local_source(source):
        return None
    return revision


# What `load_backbone` reads from a local directory: config, weights (single or sharded, with their index) and
# tokenizer files. READMEs, logs and hidden folders do not change the model and are left out.
MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".pt", ".pth", ".model", ".txt", ".tiktoken")


def local_model_fingerprint(directory: str | Path, memo_file: str | Path | None = None) -> str:
    """sha256 over the names and contents of a local model directory's weight, config and tokenizer files, so
    different weights saved into the same directory give a different backbone cache key (and everything
    downstream of it is recomputed). Each file's digest is remembered in `memo_file` while the file is
    unchanged (pipeline/data/checksums.py: `remembered_sha256`), so a 5 GB checkpoint is hashed once, not
    at every start."""
    from pipeline.data.checksums import remembered_sha256

    directory = Path(directory)
    files = sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and p.suffix in MODEL_FILE_SUFFIXES and not p.name.startswith(".")
    )
    if not files:
        raise BackboneError(f"model directory {str(directory)!r} holds no model files (config.json, weights)")
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{remembered_sha256(path, memo_file)}\n".encode())
    return digest.hexdigest()


def require_loadable(source: str, revision: str | None) -> None:
    """Fail at once, with the offline alternatives named, when `source` is neither a local directory nor a
    hub model that is cached or reachable (no long retry loops inside transformers)."""
    if Path(source).is_dir():
        return
    if source.startswith(("/", "./", "../")):
        raise BackboneError(f"model directory {source!r} does not exist")
    if not _hub_snapshot_cached(source, revision) and not hub_reachable():
        raise BackboneError(
            f"cannot load {source!r}@{revision or 'main'}: the Hugging Face hub is unreachable and the "
            "model is not in the local cache. Use the offline default (model=tiny), a local directory "
            "(model.source=/path/to/model), or run where the hub is reachable once to cache it."
        )


def load_backbone(
    source: str | Path,
    revision: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    with_tokenizer: bool = True,
):
    """Load a causal LM frozen and in eval mode, plus its tokenizer.

    `source` is a local directory written by `save_pretrained` or a hub id. A hub model that is neither
    cached nor reachable fails at once with the offline alternatives named (no long retry loops).
    `trust_remote_code` is never enabled: only architectures that ship with transformers load.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source_str = str(source)
    is_local = Path(source_str).is_dir()
    require_loadable(source_str, revision)
    kwargs = {"revision": revision} if (revision and not is_local) else {}
    torch_dtype = resolve_dtype(dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source_str, dtype=torch_dtype, trust_remote_code=False, **kwargs
        )
    except OSError as err:
        raise BackboneError(f"cannot load model {source_str!r}: {err}") from err
    model.to(resolve_device(device) if isinstance(device, str) else device)
    model.eval()
    model.requires_grad_(False)
    tokenizer = None
    if with_tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(source_str, trust_remote_code=False, **kwargs)
    return model, tokenizer


# --- architecture facts --------------------------------------------------------------------------------------


def decoder_of(model: nn.Module) -> nn.Module:
    """The stack of blocks (GPT-NeoX: `model.gpt_neox`; Llama family: `model.model`)."""
    for attr in ("gpt_neox", "model", "transformer"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module) and hasattr(inner, "layers"):
            return inner
    raise BackboneError(f"unsupported architecture {type(model).__name__}: no decoder with `.layers` found")


def final_norm_of(model: nn.Module) -> nn.Module:
    """The final normalization applied before the unembedding (LayerNorm for Pythia, RMSNorm for Llama)."""
    decoder = decoder_of(model)
    for attr in ("final_layer_norm", "norm", "ln_f"):
        norm = getattr(decoder, attr, None)
        if isinstance(norm, nn.Module):
            return norm
    raise BackboneError(f"unsupported architecture {type(model).__name__}: no final norm found")


def num_layers_of(model: nn.Module) -> int:
    return len(decoder_of(model).layers)


def unembedding_of(model: nn.Module) -> nn.Linear:
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise BackboneError(f"unsupported output head {type(head).__name__}")
    return head


def backbone_fingerprint(model: nn.Module) -> str:
    """A short hash of the unembedding weights, identifying the backbone a set of heads belongs to.

    The weights are hashed after rounding to bfloat16, so the same checkpoint loaded in fp32, fp16 or bf16
    gets the same fingerprint (fp16 -> fp32 is exact; both then round to the same bf16 values).
    """
    weight = unembedding_of(model).weight.detach().to("cpu", torch.bfloat16).contiguous()
    digest = hashlib.sha256()
    digest.update(str(tuple(weight.shape)).encode())
    digest.update(weight.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def default_head_layers(num_layers: int, n_heads: int = 4) -> list[int]:
    """Block indices of the early-exit heads: numpy.linspace(0, L, n+2, dtype=int)[1:-1] (docs/design.md §1)."""
    import numpy as np

    return [int(x) for x in np.linspace(0, num_layers, n_heads + 2, dtype=int)[1:-1]]


# --- the backbone stage's output --------------------------------------------------------------------------

BACKBONE_RECORD = "backbone.json"
LOCAL_MODEL_DIR = "model"


def load_from_stage_output(
    directory: str | Path,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    with_tokenizer: bool = True,
):
    """Load the backbone described by a finished `backbone` stage output: the locally saved model (the
    offline tiny model) or the hub id + revision it records."""
    import json

    directory = Path(directory)
    record_path = directory / BACKBONE_RECORD
    if not record_path.is_file():
        raise BackboneError(f"{record_path} is missing; rerun the backbone stage (force=[backbone])")
    record = json.loads(record_path.read_text())
    source = directory / LOCAL_MODEL_DIR if record.get("local") else record["source"]
    return load_backbone(
        source, revision=record.get("revision"), dtype=dtype, device=device, with_tokenizer=with_tokenizer
    )
