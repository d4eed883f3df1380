"""What every strategy is: an `nn.Module` that describes itself and computes its loss.

A strategy's trainable parts (projection heads) are its parameters and are
optimised together with the student. Its options are the keyword-only
arguments of its constructor; the registry (raykd.strategies) fills them
from `strategy_options`.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from raykd.models import Captured, ForwardNeeds


class Strategy(nn.Module):
    """Base: what a strategy needs from teacher and student, its checks, extra FLOPs and loss."""

    name: str = ""
    needs_teacher: bool = True

    @classmethod
    def check(cls, student, teacher, **options) -> None:
        """Raise ValueError "field: message" if this pair or these options cannot run the strategy."""

    def teacher_needs(self) -> ForwardNeeds | None:
        """What the teacher's forward must produce; None: the strategy never calls a teacher."""
        return None

    def student_needs(self) -> ForwardNeeds:
        """What the student's forward must produce."""
        return ForwardNeeds(masked_logits=True)

    def extra_flops(self, sequences: int, length: int) -> tuple[float, float]:
        """Forward FLOPs of the loss's own matmuls (projections, relation products), beyond the two
        encoders: (student side, trained and charged 3×; teacher side, charged once)."""
        return 0.0, 0.0

    def loss(self, student: Captured, teacher: Captured | None, batch: dict) -> tuple[torch.Tensor, dict]:
        """The training loss and its detached parts (for logging)."""
        raise NotImplementedError


def mlm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over masked positions, averaged over them."""
    return F.cross_entropy(logits.float(), targets)


def soft_target_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(z_t/τ) ‖ softmax(z_s/τ)), summed over the vocabulary and averaged over positions.

    (The original code averaged over the vocabulary too, shrinking it ~30 000×.)
    """
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean")


def check_positive(key: str, value: float) -> None:
    """ValueError naming `strategy_options.<key>` unless value > 0."""
    if not value > 0:
        raise ValueError(f"strategy_options.{key}: must be positive, got {value}")
