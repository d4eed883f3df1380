"""The four pretraining strategies of SPEC §2, each one small unit.

A strategy says what it needs from the teacher's forward pass (`ForwardNeeds`)
and from the student's, and computes its loss from the two `Captured`
outputs. TinyBERT's projection heads are trainable parameters of the
strategy module and are optimised together with the student.

Adding a strategy: subclass `Strategy`, add it to `STRATEGIES`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from raykd.models import Captured, ForwardNeeds, ModelShape


@dataclass(frozen=True)
class StrategyOptions:
    """Knobs of the KD losses (SPEC §2 defaults)."""

    temperature: float = 1.0
    alpha: float = 0.5
    layer_map: tuple[int, ...] | None = None  # tinybert: teacher layer for student layers 1..L_s
    relation_heads: int = 4  # minilm
    teacher_layer: int | None = None  # minilm: teacher layer matched to the student's last (default: last)


def uniform_layer_map(student_layers: int, teacher_layers: int) -> tuple[int, ...]:
    """g(m) = m * L_t / L_s for m = 1..L_s (rounded to the nearest layer)."""
    return tuple(round(m * teacher_layers / student_layers) for m in range(1, student_layers + 1))


def mlm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over masked positions, averaged over them."""
    return F.cross_entropy(logits.float(), targets)


class Strategy(nn.Module):
    """Base: a strategy's teacher needs, student needs, and loss."""

    name: str = ""
    uses_student_head: bool = True

    def teacher_needs(self) -> ForwardNeeds | None:
        """None means the strategy never calls a teacher."""
        return None

    def student_needs(self) -> ForwardNeeds:
        return ForwardNeeds(masked_logits=True)

    def loss(self, student: Captured, teacher: Captured | None, batch: dict) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError


class Scratch(Strategy):
    """Masked-LM pretraining with no teacher."""

    name = "scratch"

    def loss(self, student, teacher, batch):
        loss = mlm_loss(student.masked_logits, batch["masked_targets"])
        return loss, {"mlm_loss": loss.detach()}


class VanillaKD(Strategy):
    """α·τ²·KL(p_t ‖ p_s) at masked positions + (1−α)·MLM.

    The KL is summed over the vocabulary and averaged over masked positions
    (the original code averaged over the vocabulary too, shrinking it ~30 000×).
    """

    name = "vanilla_kd"

    def __init__(self, temperature: float, alpha: float):
        super().__init__()
        self.temperature = temperature
        self.alpha = alpha

    def teacher_needs(self):
        return ForwardNeeds(masked_logits=True)

    def loss(self, student, teacher, batch):
        tau = self.temperature
        log_p_s = F.log_softmax(student.masked_logits.float() / tau, dim=-1)
        log_p_t = F.log_softmax(teacher.masked_logits.float() / tau, dim=-1)
        kd = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean")
        mlm = mlm_loss(student.masked_logits, batch["masked_targets"])
        loss = self.alpha * tau * tau * kd + (1.0 - self.alpha) * mlm
        return loss, {"kd_loss": kd.detach(), "mlm_loss": mlm.detach()}


class TinyBERT(Strategy):
    """MSE on embeddings, on every mapped layer's hidden states and pre-softmax attention scores."""

    name = "tinybert"
    uses_student_head = False

    def __init__(self, student: ModelShape, teacher: ModelShape, layer_map: tuple[int, ...]):
        super().__init__()
        self.layer_map = layer_map
        # Projections only where widths differ (identity otherwise).
        self.embedding_projection = nn.Linear(student.hidden, teacher.hidden, bias=False) if student.hidden != teacher.hidden else None
        self.hidden_projection = nn.Linear(student.hidden, teacher.hidden, bias=False) if student.hidden != teacher.hidden else None

    def teacher_needs(self):
        return ForwardNeeds(hidden_layers=(0, *self.layer_map), score_layers=tuple(self.layer_map))

    def student_needs(self):
        layers = tuple(range(1, len(self.layer_map) + 1))
        return ForwardNeeds(hidden_layers=(0, *layers), score_layers=layers)

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


class MiniLM(Strategy):
    """MiniLMv2: KL between teacher and student Q-Q, K-K, V-V self-attention relations."""

    name = "minilm"
    uses_student_head = False

    def __init__(self, student_layers: int, teacher_layer: int, relation_heads: int):
        super().__init__()
        self.student_layer = student_layers
        self.teacher_layer = teacher_layer
        self.relation_heads = relation_heads

    def teacher_needs(self):
        return ForwardNeeds(qkv_layers=(self.teacher_layer,))

    def student_needs(self):
        return ForwardNeeds(qkv_layers=(self.student_layer,))

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


STRATEGIES = ("scratch", "vanilla_kd", "tinybert", "minilm")


def build_strategy(name: str, student: ModelShape, teacher: ModelShape | None, options: StrategyOptions) -> Strategy:
    """The strategy `name` for this student/teacher pair (shapes already validated by config)."""
    if name == "scratch":
        return Scratch()
    if name == "vanilla_kd":
        return VanillaKD(options.temperature, options.alpha)
    if name == "tinybert":
        return TinyBERT(student, teacher, options.layer_map or uniform_layer_map(student.layers, teacher.layers))
    if name == "minilm":
        return MiniLM(student.layers, options.teacher_layer or teacher.layers, options.relation_heads)
    raise ValueError(f"strategy: unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")


def check_pair(name: str, student: ModelShape, teacher: ModelShape | None, options: StrategyOptions) -> None:
    """Raise ValueError naming the field if this student/teacher pair cannot run `name`."""
    if name not in STRATEGIES:
        raise ValueError(f"strategies: unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    if name == "scratch":
        return
    if teacher is None:
        raise ValueError(f"teacher: strategy {name!r} needs a teacher")
    if name == "tinybert":
        if options.layer_map is None and teacher.layers < student.layers:
            raise ValueError(f"teacher.shape.layers: tinybert maps each of the student's {student.layers} layers "
                             f"to its own teacher layer; the teacher has only {teacher.layers}")
        layer_map = options.layer_map or uniform_layer_map(student.layers, teacher.layers)
        if len(layer_map) != student.layers:
            raise ValueError(f"strategy_options.layer_map: needs {student.layers} entries (one per student layer), got {len(layer_map)}")
        for t in layer_map:
            if not 1 <= t <= teacher.layers:
                raise ValueError(f"strategy_options.layer_map: teacher layer {t} out of range 1..{teacher.layers}")
        if student.heads != teacher.heads:
            raise ValueError(f"teacher.shape.heads: tinybert matches attention scores head by head; "
                             f"student has {student.heads} heads, teacher {teacher.heads}")
    if name == "minilm":
        r = options.relation_heads
        if r < 1 or student.hidden % r or teacher.hidden % r:
            raise ValueError(f"strategy_options.relation_heads: {r} must divide both the student width "
                             f"{student.hidden} and the teacher width {teacher.hidden}")
        t = options.teacher_layer or teacher.layers
        if not 1 <= t <= teacher.layers:
            raise ValueError(f"strategy_options.teacher_layer: {t} out of range 1..{teacher.layers}")
