"""The compute budget: the one place that charges steps and decides when training stops.

A budget is an amount in a unit: `flops` (default), `device_seconds`
(wall-clock × devices held, teacher actors included) or `tokens`. Every step
is charged in all three units; the budget's unit decides the stop: a step
runs only if its charge fits in what is left (SPEC §3), so at the end
spent ≤ budget and budget − spent < one step's charge. Device time is only
known after a step, so its charge is estimated from the previous step.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

UNITS = ("flops", "device_seconds", "tokens")
WARMUP_FRACTION = 0.06


@dataclass
class Ledger:
    """What a trial has spent so far, in every unit."""

    flops: float = 0.0  # student + teacher
    teacher_flops: float = 0.0
    tokens: int = 0
    device_seconds: float = 0.0
    steps: int = 0

    def spent(self, unit: str) -> float:
        return float(getattr(self, unit))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class StepCharge:
    """One optimizer step's cost, summed over all training workers."""

    flops: float
    teacher_flops: float
    tokens: int


class BudgetMeter:
    """Charges steps to a ledger and admits a step only if it fits in the budget."""

    def __init__(self, amount: float, unit: str, devices: int, ledger: Ledger | None = None):
        if unit not in UNITS:
            raise ValueError(f"budget_unit: unknown unit {unit!r}; known: {', '.join(UNITS)}")
        if not amount > 0:
            raise ValueError(f"budget: must be positive, got {amount}")
        self.amount = float(amount)
        self.unit = unit
        self.devices = devices
        self.ledger = ledger or Ledger()
        self.last_step_seconds = 0.0

    def charge_in_unit(self, charge: StepCharge) -> float:
        """The step's charge in the budget's unit (device time: the last step's, as an estimate)."""
        if self.unit == "flops":
            return charge.flops
        if self.unit == "tokens":
            return float(charge.tokens)
        return self.last_step_seconds * self.devices

    def admits(self, charge: StepCharge) -> bool:
        """Whether the step fits in what is left of the budget."""
        return self.ledger.spent(self.unit) + self.charge_in_unit(charge) <= self.amount

    def fraction_after(self, charge: StepCharge) -> float:
        """Fraction of the budget spent once this step is charged (drives the LR schedule)."""
        return min(1.0, (self.ledger.spent(self.unit) + self.charge_in_unit(charge)) / self.amount)

    def record(self, charge: StepCharge, seconds: float) -> None:
        """Charge a finished step that took `seconds` of wall-clock time."""
        self.ledger.flops += charge.flops
        self.ledger.teacher_flops += charge.teacher_flops
        self.ledger.tokens += charge.tokens
        self.ledger.device_seconds += seconds * self.devices
        self.ledger.steps += 1
        self.last_step_seconds = seconds

    @property
    def fraction(self) -> float:
        return min(1.0, self.ledger.spent(self.unit) / self.amount)


def lr_at(fraction: float, peak_lr: float, warmup: float = WARMUP_FRACTION) -> float:
    """Linear warmup over the first `warmup` of the budget, then linear decay to 0 at 100 %."""
    if fraction < warmup:
        return peak_lr * fraction / warmup
    return peak_lr * max(0.0, 1.0 - fraction) / (1.0 - warmup)
