"""How training uses its device: numeric precision, TF32, the fused optimizer, the device's name.

`train.precision` is one of PRECISIONS; "auto" resolves to bf16 on CUDA
(what GPU pretraining uses) and fp32 on CPU (CPU bf16 matmuls are no faster
on the machines this was written on, and fp32 keeps CPU runs exact). Mixed
precision means autocast around forward passes: weights, gradients and the
optimizer stay fp32; fp16 additionally scales the loss (`GradScaler`) so
small gradients do not underflow.
"""
from __future__ import annotations

import contextlib
import platform

import torch

from raykd.config import PRECISIONS  # noqa: E402  (kept in config, which validates without torch)
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """The concrete precision ("fp32", "bf16" or "fp16") for `precision` on `device`."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision: unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def autocast(precision: str, device: torch.device | str):
    """A context running matmuls in `precision` on `device` (a no-op for fp32)."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=_AUTOCAST_DTYPES[precision])


def grad_scaler(precision: str, device: torch.device | str) -> torch.amp.GradScaler:
    """Loss scaling for fp16; disabled (a pass-through) for fp32 and bf16, whose range needs none."""
    device_type = torch.device(device).type
    return torch.amp.GradScaler(device_type, enabled=resolve_precision(precision, device) == "fp16")


def enable_tf32() -> None:
    """Let CUDA run fp32 matmuls and convolutions on TF32 tensor cores (what is left in fp32 under autocast)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def device_name(device: torch.device | str) -> str:
    """A human name of the device a trial ran on, as recorded in results (e.g. 'NVIDIA H100 80GB HBM3')."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
