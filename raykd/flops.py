"""Analytic FLOP model of one optimizer step (SPEC §3).

Counts the matrix products a step really runs (as `FlopCounterMode` does):
the encoder's projections and FFN, attention scores and values, the LM head
at the positions actually computed, and whatever each strategy's loss adds
(`Strategy.extra_flops`: projection heads, relation products). Student training = 3 × its forward (forward + backward of
both operands); the teacher = 1 × its forward up to the highest layer used.
The count does not depend on the attention kernel: fused attention runs the
same two L × L products per head as the explicit matmuls.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils import flop_counter

from raykd.models import ForwardNeeds, ModelShape
from raykd.strategies.base import Strategy


def forward_flops(shape: ModelShape, vocab_size: int, needs: ForwardNeeds, sequences: int, length: int,
                  masked: int) -> float:
    """FLOPs of `encode` on `sequences` × `length` tokens with `masked` LM-head positions."""
    d, ff = shape.hidden, shape.intermediate
    top = needs.upto_layer(shape.layers)
    full_layers = top - 1 if needs.top_is_qkv_only(shape.layers) else top
    tokens = sequences * length
    per_layer = tokens * 2 * (4 * d * d + 2 * d * ff) + sequences * 2 * (2 * length * length * d)
    flops = full_layers * per_layer
    if top > full_layers:  # only Q, K and V of the top layer
        flops += tokens * 2 * 3 * d * d
    if needs.masked_logits:
        flops += masked * 2 * (d * d + d * vocab_size)
    return float(flops)


@dataclass(frozen=True)
class StepFlops:
    """One optimizer step's charge, split by who spends it."""

    student: float  # forward + backward of the student and trainable loss parts
    teacher: float  # teacher forward and teacher-only loss parts (no backward)

    @property
    def total(self) -> float:
        return self.student + self.teacher


def step_flops(strategy: Strategy, student: ModelShape, teacher: ModelShape | None, vocab_size: int,
               sequences: int, length: int, masked: int) -> StepFlops:
    """Charge of one step of `strategy` on a batch of `sequences` × `length` with `masked` targets."""
    student_fwd = forward_flops(student, vocab_size, strategy.student_needs(), sequences, length, masked)
    teacher_fwd = 0.0
    needs = strategy.teacher_needs()
    if needs is not None:
        teacher_fwd = forward_flops(teacher, vocab_size, needs, sequences, length, masked)
    extra_student, extra_teacher = strategy.extra_flops(sequences, length)
    student_fwd += extra_student
    teacher_fwd += extra_teacher
    return StepFlops(student=3.0 * student_fwd, teacher=teacher_fwd)


def count_fused_cpu_attention() -> None:
    """Make `FlopCounterMode` count CPU fused attention, which torch (2.13) counts as 0 FLOPs.

    Without dropout, `scaled_dot_product_attention` on CPU runs
    `_scaled_dot_product_flash_attention_for_cpu`, an op with no registered
    formula (CUDA's flash, efficient and cuDNN kernels have one; with dropout
    CPU falls back to plain matmuls, which are counted). This registers model
    FLOPs for it: forward, torch's own formula for the CUDA kernels (two L × L
    products); backward, the gradients of those two products (twice the
    forward). torch's CUDA backward formula adds the kernel's recomputation of
    the scores (2.5 × forward); like MFU, raykd charges model work, not
    recomputation. Safe to call more than once.
    """
    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    @flop_counter.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)
