"""`minilm` (MiniLMv2): Q-Q, K-K and V-V self-attention relations of one layer (SPEC §2).

    loss = Σ_{X∈{Q,K,V}} mean over relation heads r and real queries i of KL(rel_t ‖ rel_s),
    rel = softmax(X_r X_rᵀ / √d_r) over real keys

X (B, L, d) is the concatenation of all attention heads, re-split into R
relation heads of width d/R on each side (R independent of the attention
head count). The student's last layer is matched with `teacher_layer`
(default: the teacher's last); the teacher forward stops there.
"""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from raykd.models import ForwardNeeds
from raykd.strategies.base import Strategy


class MiniLM(Strategy):
    """MiniLMv2: KL between teacher and student Q-Q, K-K, V-V self-attention relations."""

    name = "minilm"

    def __init__(self, student, teacher, *, relation_heads: int = 4, teacher_layer: int | None = None):
        super().__init__()
        self.student_layer = student.layers
        self.teacher_layer = teacher_layer or teacher.layers
        self.relation_heads = relation_heads
        self.widths = (student.hidden, teacher.hidden)

    @classmethod
    def check(cls, student, teacher, *, relation_heads, teacher_layer):
        r = relation_heads
        if r < 1 or student.hidden % r or teacher.hidden % r:
            raise ValueError(f"strategy_options.relation_heads: {r} must divide both the student width "
                             f"{student.hidden} and the teacher width {teacher.hidden}")
        t = teacher_layer or teacher.layers
        if not 1 <= t <= teacher.layers:
            raise ValueError(f"strategy_options.teacher_layer: {t} out of range 1..{teacher.layers}")

    def teacher_needs(self):
        return ForwardNeeds(qkv_layers=(self.teacher_layer,))

    def student_needs(self):
        return ForwardNeeds(qkv_layers=(self.student_layer,))

    def extra_flops(self, sequences, length):
        # Q-Q, K-K and V-V relation products on each side.
        d_s, d_t = self.widths
        return float(3 * sequences * 2 * length * length * d_s), float(3 * sequences * 2 * length * length * d_t)

    def loss(self, student, teacher, batch):
        mask = batch["attention_mask"]
        parts = {}
        for name, s, t in zip("qkv", student.qkv[self.student_layer], teacher.qkv[self.teacher_layer]):
            parts[f"{name}_relation_loss"] = relation_kl(s, t, mask, self.relation_heads)
        loss = sum(parts.values())
        return loss, {"kd_loss": loss.detach(), **{k: v.detach() for k, v in parts.items()}}


def relations(x: torch.Tensor, attention_mask: torch.Tensor, relation_heads: int) -> torch.Tensor:
    """Log of softmax(X_r X_rᵀ / √d_r) per relation head, over real keys: (B, R, L, L).

    X (B, L, d) is the concatenation of all attention heads; it is re-split into
    R relation heads of width d / R, independent of the attention head count.
    """
    batch, length, width = x.shape
    d_r = width // relation_heads
    xr = x.float().view(batch, length, relation_heads, d_r).transpose(1, 2)
    logits = torch.matmul(xr, xr.transpose(-1, -2)) / math.sqrt(d_r)
    logits = logits.masked_fill(attention_mask[:, None, None, :] == 0, float("-inf"))
    return F.log_softmax(logits, dim=-1)


def relation_kl(student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor, relation_heads: int) -> torch.Tensor:
    """Mean over relation heads and real query positions of KL(rel_t ‖ rel_s)."""
    log_s = relations(student, attention_mask, relation_heads)
    log_t = relations(teacher, attention_mask, relation_heads)
    p_t = log_t.exp()
    # Padded keys have p_t = 0 and log = -inf on both sides: their terms are 0, not NaN.
    kl = torch.where(p_t > 0, p_t * (log_t - log_s), torch.zeros_like(p_t)).sum(-1)  # (B, R, L)
    queries = attention_mask[:, None, :].float()
    return (kl * queries).sum() / (queries.sum() * relation_heads)


STRATEGY = MiniLM
