"""Analytic FLOPs per step vs torch's FlopCounterMode, per strategy (SPEC §3).

Runs one full training step (teacher forward, student forward, loss, backward)
of each strategy on a preset's shapes and batch, counts its FLOPs with
FlopCounterMode, and compares with raykd.flops. Last line: JSON of the ratios. Fused attention on
CPU (the teacher, in eval mode) runs a kernel torch's counter leaves at 0 FLOPs;
`count_fused_cpu_attention` gives it torch's own attention formula, so the
check counts every attention product whichever kernel ran.

    python bench/flops_check.py [--preset local]
"""
import argparse
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from raykd.config import load_config
from raykd.flops import count_fused_cpu_attention, step_flops
from raykd.models import build_masked_lm
from raykd.strategies import build_strategy
from raykd.teacher import ColocatedTeacher, LocalTeacher
from raykd.train import StudentStep, prepare_batch


def random_masked_batch(batch_size, seq_len, vocab_size, mask_prob, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab_size, (batch_size, seq_len), generator=g)
    selected = torch.rand(batch_size, seq_len, generator=g) < mask_prob
    labels = torch.where(selected, ids, torch.full_like(ids, -100))
    return prepare_batch({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="local")
    args = parser.parse_args()
    count_fused_cpu_attention()
    config = load_config(args.preset)
    student_shape, teacher_shape = config.student, config.teacher.shape
    vocab, seq = config.data.vocab_size, config.data.seq_len
    batch = random_masked_batch(config.train.per_worker_batch, seq, vocab, config.data.mask_prob)
    masked = int(batch["masked_positions"].sum())
    student = build_masked_lm(student_shape, vocab, seq, seed=0)
    teacher = build_masked_lm(teacher_shape, vocab, seq, seed=1)
    ratios = {}
    print(f"preset {args.preset}: student {student_shape}, teacher {teacher_shape}, batch {tuple(batch['input_ids'].shape)}, {masked} masked")
    for name in config.strategies:
        strategy = build_strategy(name, student_shape, teacher_shape, config.strategy_options)
        step = StudentStep(student, strategy)
        needs = strategy.teacher_needs()
        client = ColocatedTeacher(LocalTeacher(teacher, needs)) if needs else None
        with FlopCounterMode(display=False) as counter:
            outputs = client.collect(client.request(batch)) if client else None
            loss, _ = step(batch, outputs)
            loss.backward()
        student.zero_grad(set_to_none=True)
        analytic = step_flops(strategy, student_shape, teacher_shape, vocab, *batch["input_ids"].shape, masked)
        counted = counter.get_total_flops()
        ratios[name] = round(analytic.total / counted, 4)
        print(f"{name:>10}: analytic {analytic.total / 1e9:9.3f} GFLOP (teacher {analytic.teacher / 1e9:8.3f})"
              f"  counted {counted / 1e9:9.3f} GFLOP  ratio {ratios[name]:.4f}")
    print(json.dumps({"preset": args.preset, "analytic_over_counted": ratios,
                      "all_within_5pct": all(0.95 <= r <= 1.05 for r in ratios.values())}))


if __name__ == "__main__":
    main()
