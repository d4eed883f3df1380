"""Precision, loss scaling and torch.compile in the training loop (raykd.device), on CPU."""
import pytest
import torch

from raykd.budget import BudgetMeter
from raykd.config import ConfigError, load_config
from raykd.device import grad_scaler, resolve_precision
from raykd.models import ModelShape, build_masked_lm
from raykd.strategies import build_strategy
from raykd.teacher import ColocatedTeacher, LocalTeacher
from raykd.train import StudentStep, make_optimizer, pretrain

STUDENT, TEACHER, VOCAB, SEQ, BATCH = ModelShape(2, 16, 2, 32), ModelShape(2, 16, 2, 32), 60, 12, 4


def batches(count, seed=0, fixed_masks=False):
    """Random batches; fixed_masks: the same two masked columns in every batch (constant shapes)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(5, VOCAB, (BATCH, SEQ), generator=g)
        masked = torch.zeros(BATCH, SEQ, dtype=torch.bool)
        masked[:, [1, 5]] = True
        if not fixed_masks:
            masked |= torch.rand(BATCH, SEQ, generator=g) < 0.15
        labels = torch.where(masked, ids, torch.full_like(ids, -100))
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def train(name, precision, steps=6, compile=False, fixed_masks=False):
    """Losses of `steps` steps of `name` (dropout off, so runs are comparable) and the trained student."""
    student = build_masked_lm(STUDENT, VOCAB, SEQ, seed=0, dropout=0.0)
    strategy = build_strategy(name, STUDENT, TEACHER, {"relation_heads": 2})
    step = StudentStep(student, strategy)
    optimizer = make_optimizer(step, 1e-3)
    needs = strategy.teacher_needs()
    teacher = (ColocatedTeacher(LocalTeacher(build_masked_lm(TEACHER, VOCAB, SEQ, seed=1), needs, precision=precision))
               if needs else None)
    meter = BudgetMeter(steps * BATCH * SEQ, "tokens", devices=1)
    module = torch.compile(step) if compile else step
    reports = list(pretrain(module, strategy, batches(steps + 1, fixed_masks=fixed_masks), meter, optimizer, peak_lr=1e-3,
                            student_shape=STUDENT, teacher_shape=TEACHER, vocab_size=VOCAB, teacher=teacher,
                            precision=precision))
    return [r.loss for r in reports], student


def test_auto_precision_is_bf16_on_cuda_and_fp32_on_cpu():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", torch.device("cuda", 0)) == "bf16"  # naming a device needs no GPU
    assert resolve_precision("fp16", "cpu") == "fp16"


def test_an_unknown_precision_is_named():
    with pytest.raises(ConfigError) as error:
        load_config("smoke", overrides=["train.precision=x"])
    assert str(error.value) == "train.precision: unknown precision 'x'; known: auto, fp32, bf16, fp16"
    with pytest.raises(ValueError, match="^train.precision: unknown precision 'fp8'"):
        resolve_precision("fp8", "cpu")


def test_only_fp16_scales_the_loss():
    assert grad_scaler("fp16", "cpu").is_enabled()
    assert not grad_scaler("bf16", "cpu").is_enabled() and not grad_scaler("auto", "cpu").is_enabled()


@pytest.mark.parametrize("name", ["scratch", "vanilla_kd"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_tracks_fp32(name, precision):
    reference, _ = train(name, "fp32")
    losses, student = train(name, precision)
    assert len(losses) == len(reference) == 6
    # Same data and initialisation: the losses follow fp32's within rounding, but are not fp32's.
    assert losses == pytest.approx(reference, rel=2e-2)
    assert losses != reference
    # Weights and optimizer state stay fp32 under autocast (and through the fp16 grad scaler).
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in student.parameters())


def test_a_compiled_training_step_trains_like_the_eager_one(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # inductor writes its kernels under TMPDIR
    # Constant batch shapes: one compilation, not a second one with dynamic shapes (it is slow on CPU).
    eager, _ = train("scratch", "fp32", steps=3, compile=False, fixed_masks=True)
    compiled, _ = train("scratch", "fp32", steps=3, compile=True, fixed_masks=True)
    assert compiled == pytest.approx(eager, rel=1e-4)
