"""The teacher: outputs a strategy needs, produced once per batch without gradients.

`LocalTeacher` runs inside the training process (the colocated mode). The
Ray actor pool wraps the same class (raykd.teacher_actors). The teacher
always runs in eval mode: dropout off, whatever its config says.
"""
from __future__ import annotations

import torch
from transformers import BertForMaskedLM

from raykd.models import Captured, ForwardNeeds, encode


class LocalTeacher:
    """A frozen masked LM answering `outputs(batch)` for one strategy's needs."""

    def __init__(self, model: BertForMaskedLM, needs: ForwardNeeds, dtype: torch.dtype = torch.float32):
        self.model = model.eval().requires_grad_(False)
        self.needs = needs
        self.dtype = dtype

    @torch.inference_mode()
    def outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                masked_positions: torch.Tensor | None) -> Captured:
        """Teacher outputs for one batch, cast to the transport dtype."""
        captured = encode(self.model, input_ids, attention_mask, self.needs, masked_positions)
        return cast(captured, self.dtype)


def cast(captured: Captured, dtype: torch.dtype) -> Captured:
    """A copy of `captured` with every tensor in `dtype` (a no-op when it already is)."""
    return Captured(
        hidden={k: v.to(dtype) for k, v in captured.hidden.items()},
        scores={k: v.to(dtype) for k, v in captured.scores.items()},
        qkv={k: tuple(t.to(dtype) for t in v) for k, v in captured.qkv.items()},
        masked_logits=None if captured.masked_logits is None else captured.masked_logits.to(dtype),
    )
