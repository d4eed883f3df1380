"""`scratch`: masked-LM pretraining with no teacher (SPEC §2).

    loss = MLM cross-entropy over the masked positions M
"""
from __future__ import annotations

from raykd.strategies.base import Strategy, mlm_loss


class Scratch(Strategy):
    """Masked-LM pretraining with no teacher."""

    name = "scratch"
    needs_teacher = False

    def __init__(self, student=None, teacher=None):
        super().__init__()

    def loss(self, student, teacher, batch):
        loss = mlm_loss(student.masked_logits, batch["masked_targets"])
        return loss, {"mlm_loss": loss.detach()}


STRATEGY = Scratch
