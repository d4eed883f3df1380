"""The pretraining loop: one strategy, one budget, steps until the budget says stop.

Plain PyTorch, no Ray: the same loop runs in one process (tests, laptops) and
inside each Ray Train worker (raykd.ray_train), which passes in its data
shard, its teacher client and a `reduce` that sums charges across workers.
"""
from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from raykd.budget import BudgetMeter, StepCharge, lr_at
from raykd.device import autocast, grad_scaler
from raykd.flops import step_flops
from raykd.models import Captured, ForwardNeeds, ModelShape, encode
from raykd.strategies.base import Strategy, mlm_loss
from raykd.teacher import Teacher


class StudentStep(nn.Module):
    """Student plus strategy (with any trainable projection heads); forward returns the loss."""

    def __init__(self, student: nn.Module, strategy: Strategy):
        super().__init__()
        self.student = student
        self.strategy = strategy

    def forward(self, batch: dict, teacher_outputs: Captured | None) -> tuple[torch.Tensor, dict]:
        captured = encode(self.student, batch["input_ids"], batch["attention_mask"],
                          self.strategy.student_needs(), batch["masked_positions"])
        return self.strategy.loss(captured, teacher_outputs, batch)


def prepare_batch(batch: dict) -> dict:
    """Add the masked positions and their targets, which every loss and the FLOP charge use."""
    positions = batch["labels"] != -100
    return {**batch, "masked_positions": positions, "masked_targets": batch["labels"][positions]}


def make_optimizer(module: nn.Module, lr: float, betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-6,
                   weight_decay: float = 0.01, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW (defaults: the paper's pretraining); every matrix is weight-decayed, biases and
    LayerNorm weights (the 1-D parameters) are not. Used for pretraining and fine-tuning.

    fused=None: the fused kernel (one launch for all parameters) where every parameter is on
    CUDA; build the optimizer after moving `module` to its device.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    if fused is None:
        fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


@dataclass
class StepReport:
    """What one finished step reports."""

    step: int
    fraction: float
    lr: float
    loss: float
    parts: dict = field(default_factory=dict)
    ledger: dict = field(default_factory=dict)
    seconds: float = 0.0


def derived_seed(seed: int, *purpose) -> int:
    """A 63-bit seed for one purpose of a trial, e.g. (seed, "dropout", rank, step): independent
    streams for every (seed, rank, purpose), the same in every process and on every rerun."""
    digest = hashlib.sha256(repr((seed, *purpose)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _sum_local(values: torch.Tensor) -> torch.Tensor:
    return values


def pretrain(
    step_module: nn.Module,
    strategy: Strategy,
    batches: Iterable[dict],
    meter: BudgetMeter,
    optimizer: torch.optim.Optimizer,
    *,
    peak_lr: float,
    student_shape: ModelShape,
    teacher_shape: ModelShape | None,
    vocab_size: int,
    teacher: Teacher | None = None,
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] = _sum_local,
    world_size: int = 1,
    max_grad_norm: float = 1.0,
    dropout_seed: int | None = None,
    precision: str = "fp32",
) -> Iterator[StepReport]:
    """Train until the next step would exceed the budget, yielding a report after each step.

    `step_module` is a `StudentStep`, possibly wrapped in DDP or compiled.
    `reduce_sum` sums a tensor over training workers, so every worker charges
    the global step and all stop at the same step. The teacher is asked for
    batch k+1 before step k runs, so a teacher actor works while the student
    does. The forward and loss run under `precision`'s autocast (see raykd.device).
    With `dropout_seed`, the torch RNG that draws dropout masks is reseeded before
    each step from (dropout_seed, step): a step's masks depend on nothing else, so a
    run resumed from a checkpoint at step k draws what the uninterrupted run drew.
    """
    iterator = iter(batches)
    device = next(step_module.parameters()).device
    scaler = grad_scaler(precision, device)

    def fetch():
        batch = prepare_batch(next(iterator))
        return batch, (teacher.request(batch) if teacher is not None else None)

    batch, handle = fetch()
    last = time.perf_counter()
    while True:
        sequences, length = batch["input_ids"].shape
        local = step_flops(strategy, student_shape, teacher_shape, vocab_size, sequences, length,
                           int(batch["masked_positions"].sum()))
        total = reduce_sum(torch.tensor([local.total, local.teacher, float(sequences * length)], dtype=torch.float64))
        charge = StepCharge(flops=float(total[0]), teacher_flops=float(total[1]), tokens=int(total[2]))
        if not meter.admits(charge):
            return
        lr = lr_at(meter.fraction_after(charge), peak_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        next_batch, next_handle = fetch()  # teacher works on k+1 while the student runs k
        teacher_outputs = teacher.collect(handle) if teacher is not None else None
        if dropout_seed is not None:
            torch.manual_seed(derived_seed(dropout_seed, meter.ledger.steps))
        with autocast(precision, device):
            loss, parts = step_module(batch, teacher_outputs)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if max_grad_norm:
            scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
            torch.nn.utils.clip_grad_norm_(step_module.parameters(), max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        now = time.perf_counter()
        # Device time: every worker charges the mean wall time of the step.
        seconds = float(reduce_sum(torch.tensor([now - last], dtype=torch.float64))[0]) / world_size
        last = now
        meter.record(charge, seconds)
        yield StepReport(step=meter.ledger.steps, fraction=meter.fraction, lr=lr, loss=float(loss.detach()),
                         parts={k: float(v) for k, v in parts.items()}, ledger=meter.ledger.to_dict(),
                         seconds=seconds)
        batch, handle = next_batch, next_handle


@torch.no_grad()
def validation_losses(step_module: StudentStep, batches: Iterable[dict], teacher: Teacher | None = None,
                      precision: str = "fp32") -> dict:
    """On held-out batches with fixed masks: the MLM loss (nats per masked token) and the
    strategy's own objective (`val_loss`; equal to the MLM loss for `scratch`), forwards in `precision`."""
    student, strategy = step_module.student, step_module.strategy
    needs = strategy.student_needs().union(ForwardNeeds(masked_logits=True))
    was_training = step_module.training
    step_module.eval()
    mlm_total, masked, objective_total, sequences = 0.0, 0, 0.0, 0
    for raw in batches:
        batch = prepare_batch(raw)
        outputs = teacher.collect(teacher.request(batch)) if teacher is not None else None
        with autocast(precision, batch["input_ids"].device):
            captured = encode(student, batch["input_ids"], batch["attention_mask"], needs, batch["masked_positions"])
            objective, _ = strategy.loss(captured, outputs, batch)
        n = int(batch["masked_targets"].numel())
        mlm_total += float(mlm_loss(captured.masked_logits, batch["masked_targets"])) * n
        masked += n
        objective_total += float(objective) * len(batch["input_ids"])
        sequences += len(batch["input_ids"])
    step_module.train(was_training)
    return {"mlm_val_loss": mlm_total / masked if masked else math.nan,
            "val_loss": objective_total / sequences if sequences else math.nan}
