"""`vanilla_kd`: soft targets at the masked positions plus MLM (SPEC §2).

    loss = α·τ²·KL(softmax(z_t/τ) ‖ softmax(z_s/τ)) over M + (1−α)·MLM;  defaults τ = 1, α = 0.5

The KL is summed over the vocabulary and averaged over masked positions.
"""
from __future__ import annotations

from raykd.models import ForwardNeeds
from raykd.strategies.base import Strategy, check_positive, mlm_loss, soft_target_kl


class VanillaKD(Strategy):
    """α·τ²·KL(p_t ‖ p_s) at masked positions + (1−α)·MLM."""

    name = "vanilla_kd"

    def __init__(self, student=None, teacher=None, *, temperature: float = 1.0, alpha: float = 0.5):
        super().__init__()
        self.temperature = temperature
        self.alpha = alpha

    @classmethod
    def check(cls, student, teacher, *, temperature, alpha):
        check_positive("temperature", temperature)
        if not 0 <= alpha <= 1:
            raise ValueError(f"strategy_options.alpha: must be in [0, 1], got {alpha}")

    def teacher_needs(self):
        return ForwardNeeds(masked_logits=True)

    def loss(self, student, teacher, batch):
        tau = self.temperature
        kd = soft_target_kl(student.masked_logits, teacher.masked_logits, tau)
        mlm = mlm_loss(student.masked_logits, batch["masked_targets"])
        loss = self.alpha * tau * tau * kd + (1.0 - self.alpha) * mlm
        return loss, {"kd_loss": kd.detach(), "mlm_loss": mlm.detach()}


STRATEGY = VanillaKD
