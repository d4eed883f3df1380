"""`distilbert`: DistilBERT's triple loss (Sanh et al. 2019; the paper code's `distillbert`), SPEC §2.

    loss = α_ce·τ²·KL(softmax(z_t/τ) ‖ softmax(z_s/τ)) over M
         + α_mlm·MLM over M
         + α_cos·(1 − cos(H_s^{L_s} W, H_t^{L_t})) averaged over real (non-padded) tokens

The KL is summed over the vocabulary and averaged over masked positions (as
`vanilla_kd`); H^L are the last layers' hidden states; W (d_s × d_t) is a
learned projection, omitted when the widths match.

Defaults: DistilBERT's published recipe `--alpha_ce 5.0 --alpha_mlm 2.0
--alpha_cos 1.0` (huggingface/transformers,
examples/research_projects/distillation/README.md), normalised to sum to 1
(0.625, 0.25, 0.125) so that the loss is on the scale of the other
strategies' at the same learning rate, and `--temperature 2.0`, the default
of that project's train.py (whose own alpha defaults, 0.5/0.0/0.0, switch
the MLM and cosine terms off). A weight of 0 removes its term, and with it
what the term needs from the forward passes (and their FLOPs).
"""
from __future__ import annotations

from torch import nn
from torch.nn import functional as F

from raykd.models import ForwardNeeds
from raykd.strategies.base import Strategy, check_positive, mlm_loss, soft_target_kl


class DistilBERT(Strategy):
    """α_ce·τ²·KL over masked positions + α_mlm·MLM + α_cos·(1 − cos) of the last hidden states."""

    name = "distilbert"

    def __init__(self, student, teacher, *, temperature: float = 2.0, alpha_ce: float = 0.625,
                 alpha_mlm: float = 0.25, alpha_cos: float = 0.125):
        super().__init__()
        self.temperature, self.alpha_ce, self.alpha_mlm, self.alpha_cos = temperature, alpha_ce, alpha_mlm, alpha_cos
        self.student_layer, self.teacher_layer = student.layers, teacher.layers
        widths_differ = student.hidden != teacher.hidden
        self.projection = nn.Linear(student.hidden, teacher.hidden, bias=False) if widths_differ and alpha_cos else None

    @classmethod
    def check(cls, student, teacher, *, temperature, alpha_ce, alpha_mlm, alpha_cos):
        check_positive("temperature", temperature)
        for key, value in (("alpha_ce", alpha_ce), ("alpha_mlm", alpha_mlm), ("alpha_cos", alpha_cos)):
            if not value >= 0:
                raise ValueError(f"strategy_options.{key}: must be >= 0, got {value}")
        if not alpha_ce + alpha_mlm + alpha_cos > 0:
            raise ValueError("strategy_options.alpha_ce: distilbert needs at least one positive weight "
                             "among alpha_ce, alpha_mlm, alpha_cos")

    def teacher_needs(self):
        return ForwardNeeds(hidden_layers=(self.teacher_layer,) if self.alpha_cos else (),
                            masked_logits=bool(self.alpha_ce))

    def student_needs(self):
        return ForwardNeeds(hidden_layers=(self.student_layer,) if self.alpha_cos else (),
                            masked_logits=bool(self.alpha_ce or self.alpha_mlm))

    def extra_flops(self, sequences, length):
        if self.projection is None:
            return 0.0, 0.0
        return float(sequences * length * 2 * self.projection.in_features * self.projection.out_features), 0.0

    def loss(self, student, teacher, batch):
        parts, loss = {}, 0.0
        if self.alpha_ce:
            tau = self.temperature
            parts["kd_loss"] = soft_target_kl(student.masked_logits, teacher.masked_logits, tau)  # as vanilla_kd's
            loss = loss + self.alpha_ce * tau * tau * parts["kd_loss"]
        if self.alpha_mlm:
            parts["mlm_loss"] = mlm_loss(student.masked_logits, batch["masked_targets"])
            loss = loss + self.alpha_mlm * parts["mlm_loss"]
        if self.alpha_cos:
            hidden = student.hidden[self.student_layer]
            projected = hidden if self.projection is None else self.projection(hidden)
            cosine = F.cosine_similarity(projected.float(), teacher.hidden[self.teacher_layer].float(), dim=-1)  # (B, L)
            real = batch["attention_mask"].float()
            parts["cos_loss"] = ((1.0 - cosine) * real).sum() / real.sum()
            loss = loss + self.alpha_cos * parts["cos_loss"]
        return loss, {k: v.detach() for k, v in parts.items()}


STRATEGY = DistilBERT
