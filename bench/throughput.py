"""Training throughput: tokens/s, achieved FLOP/s and model FLOPs utilisation (MFU), per strategy.

Runs raykd's own training loop (`raykd.train.pretrain`: autocast in the chosen
precision, fused attention wherever no score is read, fused AdamW on CUDA,
gradient clipping) on random masked batches, for the paper's 6 x 768 student
with each strategy (the 12 x 768 teacher colocated, as in the paper), and the
teacher's forward alone. FLOPs are raykd's analytic count (the budget's
charge: model FLOPs, no recomputation); MFU = achieved FLOP/s / the device's
peak: on a GPU its dense bf16 peak from the table below, on CPU a matmul peak
measured in the same run (in the precision's dtype, with the same threads).

    python bench/throughput.py                        # CPU: --shape small, fp32
    python bench/throughput.py --shape paper --steps 30 --warmup 10   # on a GPU (bf16)
    python bench/throughput.py --precision fp16 --compile --peak-tflops 312

Shapes: paper = student 6 x 768 (12 heads, FFN 3072), teacher 12 x 768,
vocabulary 30522, sequence 128, batch 128 per device; small = the same depths
at width 128 (4 heads, FFN 512), vocabulary 8192, batch 8: minutes on 2 CPU cores.
The last line is one JSON object.
"""
import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a plain checkout

import torch  # noqa: E402

from raykd.budget import BudgetMeter  # noqa: E402
from raykd.device import device_name, enable_tf32, resolve_precision  # noqa: E402
from raykd.flops import forward_flops, step_flops  # noqa: E402
from raykd.models import ForwardNeeds, ModelShape, build_masked_lm  # noqa: E402
from raykd.strategies import STRATEGIES, build_strategy  # noqa: E402
from raykd.teacher import ColocatedTeacher, LocalTeacher  # noqa: E402
from raykd.train import StudentStep, make_optimizer, prepare_batch, pretrain  # noqa: E402

SHAPES = {
    "paper": {"student": ModelShape(6, 768, 12, 3072), "teacher": ModelShape(12, 768, 12, 3072),
              "vocab": 30522, "seq_len": 128, "batch": 128},
    "small": {"student": ModelShape(6, 128, 4, 512), "teacher": ModelShape(12, 128, 4, 512),
              "vocab": 8192, "seq_len": 128, "batch": 8},
}
# Dense bf16 tensor-core peaks, FLOP/s, from NVIDIA's data sheets (without sparsity).
# First match of the pattern in torch.cuda.get_device_name() wins.
GPU_BF16_PEAKS = [
    (r"H100.*PCIe", 756e12),
    (r"H100", 989e12),  # SXM
    (r"H200", 989e12),
    (r"A100", 312e12),
    (r"L4\b", 121e12),
]
MASK_PROB = 0.15


def gpu_peak(name: str) -> float | None:
    """Dense bf16 peak of a GPU named `name`, or None if it is not in the table."""
    return next((peak for pattern, peak in GPU_BF16_PEAKS if re.search(pattern, name)), None)


def measured_matmul_peak(dtype: torch.dtype, size: int = 1024, repeats: int = 10) -> float:
    """Best FLOP/s of a square matmul on CPU: the peak the CPU MFU is measured against."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.matmul(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def random_batches(count: int, batch: int, seq_len: int, vocab: int, device: torch.device, seed: int = 0) -> list:
    """Packed sequences (no padding) with MASK_PROB of positions masked, as the data stream gives them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(5, vocab, (batch, seq_len), generator=g)
        labels = torch.where(torch.rand(batch, seq_len, generator=g) < MASK_PROB, ids, torch.full_like(ids, -100))
        out.append({k: v.to(device) for k, v in
                    {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}.items()})
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_rate(name: str, shape: dict, device: torch.device, precision: str, steps: int, warmup: int,
               compile_step: bool) -> dict:
    """Median step time of `steps` timed steps (after `warmup`) of `name` in raykd's loop."""
    student_shape, teacher_shape, vocab, seq_len, batch = (shape[k] for k in ("student", "teacher", "vocab", "seq_len", "batch"))
    strategy = build_strategy(name, student_shape, teacher_shape, {"relation_heads": student_shape.heads})
    step = StudentStep(build_masked_lm(student_shape, vocab, seq_len, seed=0), strategy).to(device)
    optimizer = make_optimizer(step, 1e-4)
    needs = strategy.teacher_needs()
    teacher = None
    if needs is not None:
        model = build_masked_lm(teacher_shape, vocab, seq_len, seed=1).to(device)
        teacher = ColocatedTeacher(LocalTeacher(model, needs, precision=precision))
    total = warmup + steps
    data = random_batches(total + 1, batch, seq_len, vocab, device)
    meter = BudgetMeter(total * batch * seq_len, "tokens", devices=1)
    module = torch.compile(step) if compile_step else step
    # The loop's per-step seconds are wall times between steps. On a GPU each interval ends
    # before that step's `float(loss)` waits for the device, so in steady state an interval
    # spans one step's device work: take the median after warm-up.
    seconds = [report.seconds for report in pretrain(
        module, strategy, data, meter, optimizer, peak_lr=1e-4, student_shape=student_shape,
        teacher_shape=teacher_shape, vocab_size=vocab, teacher=teacher, precision=precision)][warmup:]
    masked = [int(prepare_batch(b)["masked_positions"].sum()) for b in data[warmup:total]]
    flops = statistics.mean(step_flops(strategy, student_shape, teacher_shape, vocab, batch, seq_len, m).total
                            for m in masked)
    step_time = statistics.median(seconds)
    return {"step_ms": step_time * 1e3, "tokens_per_s": batch * seq_len / step_time, "flops_per_s": flops / step_time}


def teacher_forward_rate(shape: dict, device: torch.device, precision: str, steps: int, warmup: int) -> dict:
    """Median time of the teacher's full forward (LM head at the masked positions), as `vanilla_kd` runs it."""
    teacher_shape, vocab, seq_len, batch = (shape[k] for k in ("teacher", "vocab", "seq_len", "batch"))
    needs = ForwardNeeds(masked_logits=True)
    teacher = LocalTeacher(build_masked_lm(teacher_shape, vocab, seq_len, seed=1).to(device), needs, precision=precision)
    times, flops = [], []
    for index, raw in enumerate(random_batches(warmup + steps, batch, seq_len, vocab, device)):
        batch_ = prepare_batch(raw)
        sync(device)
        start = time.perf_counter()
        teacher.outputs(batch_["input_ids"], batch_["attention_mask"], batch_["masked_positions"])
        sync(device)
        if index >= warmup:
            times.append(time.perf_counter() - start)
            flops.append(forward_flops(teacher_shape, vocab, needs, batch, seq_len, int(batch_["masked_positions"].sum())))
    step_time = statistics.median(times)
    return {"step_ms": step_time * 1e3, "tokens_per_s": batch * seq_len / step_time,
            "flops_per_s": statistics.mean(flops) / step_time}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--shape", choices=sorted(SHAPES), help="model and batch sizes (default: paper on a GPU, small on CPU)")
    parser.add_argument("--precision", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16 or fp16")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--batch", type=int, help="sequences per step (default: the shape's)")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), help="default: all")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training step")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak in TFLOP/s (default: table or measured)")
    args = parser.parse_args(argv)
    try:
        resolve_precision(args.precision, "cpu")
    except ValueError as error:
        parser.error(str(error).replace("train.precision", "--precision"))
    for name in ("steps", "batch", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name}: must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup: must be >= 0, got {args.warmup}")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        parser.error(f"--peak-tflops: must be positive, got {args.peak_tflops}")
    unknown = [s for s in args.strategies if s not in STRATEGIES]
    if unknown:
        parser.error(f"--strategies: unknown strategy {unknown[0]!r}; known: {', '.join(STRATEGIES)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        enable_tf32()
    precision = resolve_precision(args.precision, device)
    shape_name = args.shape or ("paper" if device.type == "cuda" else "small")
    shape = {**SHAPES[shape_name], **({"batch": args.batch} if args.batch else {})}
    name = device_name(device)
    if args.peak_tflops:
        peak, peak_source = args.peak_tflops * 1e12, "--peak-tflops"
    elif device.type == "cuda":
        peak, peak_source = gpu_peak(name), "table (dense bf16)"
    else:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        peak, peak_source = measured_matmul_peak(dtype), f"measured {str(dtype).removeprefix('torch.')} matmul 1024^3"
    print(f"{name}: {precision}, shape {shape_name} (student {shape['student']}, teacher {shape['teacher']}, "
          f"batch {shape['batch']} x {shape['seq_len']}, vocab {shape['vocab']}); peak "
          f"{'unknown' if peak is None else f'{peak / 1e12:.3f} TFLOP/s'} ({peak_source})")

    def with_mfu(rate: dict) -> dict:
        rate["mfu"] = None if peak is None else rate["flops_per_s"] / peak
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in rate.items()}

    student = {}
    for strategy in args.strategies:
        student[strategy] = with_mfu(train_rate(strategy, shape, device, precision, args.steps, args.warmup, args.compile))
        print(f"  student {strategy:>10}: {student[strategy]}")
    teacher = with_mfu(teacher_forward_rate(shape, device, precision, args.steps, args.warmup))
    print(f"  teacher forward   : {teacher}")
    print(json.dumps({"device": name, "precision": precision, "shape": shape_name, "batch": shape["batch"],
                      "seq_len": shape["seq_len"], "compile": args.compile, "peak_flops_per_s": peak,
                      "peak_source": peak_source, "student": student, "teacher_forward": teacher}))


if __name__ == "__main__":
    main()
