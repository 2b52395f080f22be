"""Lightning modules of the pipeline: the early-exit heads trainer and the hidden-state data module."""

from lightning_modules.heads_module import HeadsModule, NonFiniteLossError, kl_full_to_head, teacher_logits_of
from lightning_modules.hidden_states import HiddenStatesDataModule, held_out_range

__all__ = [
    "HeadsModule",
    "HiddenStatesDataModule",
    "NonFiniteLossError",
    "held_out_range",
    "kl_full_to_head",
    "teacher_logits_of",
]
