"""The budget stop rule and the LR schedule (SPEC §3)."""
import pytest
import torch

from raykd.budget import BudgetMeter, StepCharge, lr_at
from raykd.flops import step_flops
from raykd.models import ModelShape, build_masked_lm
from raykd.strategies import STRATEGIES, build_strategy
from raykd.teacher import ColocatedTeacher, LocalTeacher
from raykd.train import StudentStep, make_optimizer, prepare_batch, pretrain

STUDENT, TEACHER, VOCAB, SEQ, BATCH = ModelShape(2, 16, 2, 32), ModelShape(2, 24, 2, 48), 60, 12, 4


def batches(count, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(5, VOCAB, (BATCH, SEQ), generator=g)
        labels = torch.where(torch.rand(BATCH, SEQ, generator=g) < 0.15, ids, torch.full_like(ids, -100))
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def run(name, amount, unit, data):
    student = build_masked_lm(STUDENT, VOCAB, SEQ, seed=0)
    strategy = build_strategy(name, STUDENT, TEACHER, {"relation_heads": 2})
    step = StudentStep(student, strategy)
    needs = strategy.teacher_needs()
    teacher = ColocatedTeacher(LocalTeacher(build_masked_lm(TEACHER, VOCAB, SEQ, seed=1), needs)) if needs else None
    meter = BudgetMeter(amount, unit, devices=1)
    reports = list(pretrain(step, strategy, data, meter, make_optimizer(step, 1e-3), peak_lr=1e-3,
                            student_shape=STUDENT, teacher_shape=TEACHER, vocab_size=VOCAB, teacher=teacher))
    return strategy, meter, reports


def charge_of(strategy, batch):
    batch = prepare_batch(batch)
    return step_flops(strategy, STUDENT, TEACHER, VOCAB, BATCH, SEQ, int(batch["masked_positions"].sum())).total


@pytest.mark.parametrize("name", STRATEGIES)
def test_flops_budget_stops_at_the_first_step_that_would_exceed_it(name):
    data = batches(40)
    strategy = build_strategy(name, STUDENT, TEACHER, {"relation_heads": 2})
    budget = 7.5 * charge_of(strategy, data[0])
    strategy, meter, reports = run(name, budget, "flops", data)
    ledger = meter.ledger
    refused = charge_of(strategy, data[ledger.steps])  # the batch that did not fit
    assert ledger.flops <= budget
    assert budget - ledger.flops < refused
    assert ledger.steps == len(reports) >= 6
    assert ledger.flops == pytest.approx(sum(charge_of(strategy, b) for b in data[:ledger.steps]))
    assert ledger.tokens == ledger.steps * BATCH * SEQ and ledger.device_seconds > 0
    if name == "scratch":
        assert ledger.teacher_flops == 0
    else:
        assert 0 < ledger.teacher_flops < ledger.flops
    # The schedule is complete: warmup then decay to (nearly) zero at the stop.
    lrs = [r.lr for r in reports]
    assert max(lrs) == pytest.approx(1e-3, rel=0.2) and lrs[-1] < 0.2e-3


def test_tokens_budget_and_reproducible_stop():
    data = batches(30)
    _, first, _ = run("vanilla_kd", 10 * BATCH * SEQ + 5, "tokens", data)
    _, second, _ = run("vanilla_kd", 10 * BATCH * SEQ + 5, "tokens", data)
    assert first.ledger.steps == 10 and first.ledger.tokens == 10 * BATCH * SEQ
    assert (first.ledger.flops, first.ledger.steps) == (second.ledger.flops, second.ledger.steps)


def test_device_seconds_budget_charges_every_device():
    meter = BudgetMeter(10.0, "device_seconds", devices=3)
    charge = StepCharge(flops=1.0, teacher_flops=0.0, tokens=8)
    assert meter.admits(charge)
    meter.record(charge, 2.0)
    assert meter.ledger.device_seconds == 6.0
    assert not meter.admits(charge)  # 6 + an estimated 6 > 10


def test_lr_schedule_is_a_function_of_the_budget_fraction():
    assert lr_at(0.0, 1.0) == 0.0
    assert lr_at(0.03, 1.0) == pytest.approx(0.5)
    assert lr_at(0.06, 1.0) == pytest.approx(1.0)
    assert lr_at(0.53, 1.0) == pytest.approx(0.5)
    assert lr_at(1.0, 1.0) == 0.0


@pytest.mark.parametrize("amount,unit,field", [(0, "flops", "budget"), (-1, "flops", "budget"), (1, "hours", "budget_unit")])
def test_bad_budget_names_the_field(amount, unit, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        BudgetMeter(amount, unit, devices=1)
