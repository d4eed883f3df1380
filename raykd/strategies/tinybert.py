"""`tinybert`: embedding, hidden-state and attention-score matching, layer by layer (SPEC §2).

    loss = MSE(H_s^0 W_e, H_t^0) + Σ_m [MSE(A_s^m, A_t^{g(m)}) + MSE(H_s^m W_h, H_t^{g(m)})]

g(m) = m·L_t/L_s unless `layer_map` gives the teacher layer of each student
layer 1..L_s. W_e, W_h are learned projections, omitted when the widths
match. Padded positions (and, in the score MSE, padded query or key
positions) are excluded. Scores are matched head by head, so the mapped
layers need equal head counts.
"""
from __future__ import annotations

import torch
from torch import nn

from raykd.models import ForwardNeeds
from raykd.strategies.base import Strategy


def uniform_layer_map(student_layers: int, teacher_layers: int) -> tuple[int, ...]:
    """g(m) = m * L_t / L_s for m = 1..L_s (rounded to the nearest layer)."""
    return tuple(round(m * teacher_layers / student_layers) for m in range(1, student_layers + 1))


class TinyBERT(Strategy):
    """MSE on embeddings, on every mapped layer's hidden states and pre-softmax attention scores."""

    name = "tinybert"

    def __init__(self, student, teacher, *, layer_map: list[int] | None = None):
        super().__init__()
        self.layer_map = tuple(layer_map) if layer_map else uniform_layer_map(student.layers, teacher.layers)
        # Projections only where widths differ (identity otherwise).
        self.embedding_projection = nn.Linear(student.hidden, teacher.hidden, bias=False) if student.hidden != teacher.hidden else None
        self.hidden_projection = nn.Linear(student.hidden, teacher.hidden, bias=False) if student.hidden != teacher.hidden else None

    @classmethod
    def check(cls, student, teacher, *, layer_map):
        if not layer_map and teacher.layers < student.layers:
            raise ValueError(f"teacher.shape.layers: tinybert maps each of the student's {student.layers} layers "
                             f"to its own teacher layer; the teacher has only {teacher.layers}")
        layer_map = layer_map or uniform_layer_map(student.layers, teacher.layers)
        if len(layer_map) != student.layers:
            raise ValueError(f"strategy_options.layer_map: needs {student.layers} entries (one per student layer), got {len(layer_map)}")
        for t in layer_map:
            if not 1 <= t <= teacher.layers:
                raise ValueError(f"strategy_options.layer_map: teacher layer {t} out of range 1..{teacher.layers}")
        if student.heads != teacher.heads:
            raise ValueError(f"teacher.shape.heads: tinybert matches attention scores head by head; "
                             f"student has {student.heads} heads, teacher {teacher.heads}")

    def teacher_needs(self):
        return ForwardNeeds(hidden_layers=(0, *self.layer_map), score_layers=tuple(self.layer_map))

    def student_needs(self):
        layers = tuple(range(1, len(self.layer_map) + 1))
        return ForwardNeeds(hidden_layers=(0, *layers), score_layers=layers)

    def extra_flops(self, sequences, length):
        if self.hidden_projection is None:
            return 0.0, 0.0
        d_s, d_t = self.hidden_projection.in_features, self.hidden_projection.out_features
        return float((1 + len(self.layer_map)) * sequences * length * 2 * d_s * d_t), 0.0

    def loss(self, student, teacher, batch):
        mask = batch["attention_mask"].float()  # (B, L)
        embedding = _hidden_mse(_project(self.embedding_projection, student.hidden[0]), teacher.hidden[0], mask)
        attention = student.hidden[0].new_zeros(())
        hidden = student.hidden[0].new_zeros(())
        for m, t in enumerate(self.layer_map, start=1):
            attention = attention + _score_mse(student.scores[m], teacher.scores[t], mask)
            hidden = hidden + _hidden_mse(_project(self.hidden_projection, student.hidden[m]), teacher.hidden[t], mask)
        loss = embedding + attention + hidden
        return loss, {"kd_loss": loss.detach(), "embedding_loss": embedding.detach(),
                      "attention_loss": attention.detach(), "hidden_loss": hidden.detach()}


def _project(projection: nn.Linear | None, x: torch.Tensor) -> torch.Tensor:
    return x if projection is None else projection(x)


def _hidden_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over non-padded positions and all features."""
    diff = (student.float() - teacher.float()).pow(2).sum(-1)  # (B, L)
    return (diff * mask).sum() / (mask.sum() * student.shape[-1])


def _score_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE of (B, H, L, L) scores over heads and pairs whose query and key are both real tokens."""
    pair = (mask[:, :, None] * mask[:, None, :])[:, None]  # (B, 1, L, L)
    diff = (student.float() - teacher.float()).pow(2) * pair
    return diff.sum() / (pair.sum() * student.shape[1])


STRATEGY = TinyBERT
