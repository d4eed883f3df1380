"""Step overhead: raykd's training step against a bare PyTorch loop and the HF Trainer.

Same model (BERT 2 x 128, 4 heads, vocab 4096, with a 4 x 256 teacher for KD: the
shapes the figures in the README were measured with) and same
batch (32 x 128, masked 15 % by raykd's masking, as the data stream does),
2 torch threads throughout. Measured, in steps/s (median step time after
warm-up):
  bare        a plain PyTorch loop: BertForMaskedLM's encoder, LM head at the
              masked positions only, cross-entropy, backward, clip at 1.0, AdamW;
  bare_full_head  the same loop with HF's own forward with labels (LM head at
              every position): the Trainer's step without the Trainer;
  hf_trainer  `transformers.Trainer` on a `datasets.Dataset` of the same
              pre-masked rows (BertForMaskedLM with labels: the LM head runs at
              every position, as Trainer users get it; its default AdamW);
  loop        raykd's single-process loop (`raykd.train.pretrain`), scratch;
  ray         `run_pretraining` with 1 Ray Train worker: scratch, vanilla_kd
              with the teacher colocated, vanilla_kd with one teacher actor
              (step time = device_seconds / devices held, from the curve).
The in-process variants run in rounds interleaved with the Ray runs, so all
see the same background load. The last line is one JSON object.

    python bench/step_overhead.py [--steps 30] [--warmup 5] [--rounds 3] [--ray-steps 60]

Needs `accelerate` (the HF Trainer requires it).
"""
import argparse
import importlib.util
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from transformers import BertConfig, BertForMaskedLM  # noqa: E402

from raykd.budget import BudgetMeter  # noqa: E402
from raykd.config import load_config  # noqa: E402
from raykd.data.masking import mask_batch  # noqa: E402
from raykd.data.meta import load_meta  # noqa: E402
from raykd.data.shards import prepare_corpus, shard_paths  # noqa: E402
from raykd.flops import step_flops  # noqa: E402
from raykd.models import build_masked_lm  # noqa: E402
from raykd.plan import Cell  # noqa: E402
from raykd.ray_train import Corpus, TrialSpec, run_pretraining  # noqa: E402
from raykd.strategies import build_strategy  # noqa: E402
from raykd.train import StudentStep, make_optimizer, pretrain  # noqa: E402

THREADS = 2
SEED = 0
RAY_WARMUP_STEPS = 10  # untimed steps at the start of each Ray run
MAX_GRAD_NORM = 1.0
BETAS, EPS, WEIGHT_DECAY = (0.9, 0.98), 1e-6, 0.01  # raykd's AdamW (make_optimizer defaults)


def masked_batches(meta_path: Path, count: int, batch_size: int, mask_prob: float) -> list[dict]:
    """`count` batches of train rows, masked by raykd's masking (pass 0), as int64 tensors."""
    meta = load_meta(meta_path)
    table = pq.read_table(shard_paths(meta, "train")[0], columns=["example_id", "input_ids"])
    rows = count * batch_size
    if table.num_rows < rows:
        raise ValueError(f"corpus has {table.num_rows} train rows; {rows} needed")
    tokens = np.stack(table.column("input_ids").to_numpy(zero_copy_only=False)[:rows])
    ids = table.column("example_id").to_numpy()[:rows]
    input_ids, labels = mask_batch(tokens, ids, 0, SEED, special_ids=meta["special_ids"],
                                   vocab_size=meta["vocab_size"], mask_prob=mask_prob)
    batches = []
    for begin in range(0, rows, batch_size):
        ids_t = torch.tensor(input_ids[begin:begin + batch_size], dtype=torch.int64)
        batches.append({"input_ids": ids_t, "labels": torch.tensor(labels[begin:begin + batch_size], dtype=torch.int64),
                        "attention_mask": (ids_t != meta["special_ids"]["pad"]).long()})
    return batches


def plain_bert_config(shape, vocab_size: int, seq_len: int) -> BertConfig:
    """The student's config written out directly (the same values raykd.models uses)."""
    return BertConfig(vocab_size=vocab_size, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                      num_attention_heads=shape.heads, intermediate_size=shape.intermediate,
                      max_position_embeddings=seq_len, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                      pad_token_id=0, type_vocab_size=2, attn_implementation="eager")


def decay_groups(model: torch.nn.Module) -> list[dict]:
    """raykd's AdamW groups, written out: no weight decay on biases and LayerNorm weights."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "LayerNorm" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "LayerNorm" in n]
    return [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]


def bare_step_times(batches: list[dict], config: BertConfig, lr: float, steps: int, full_head: bool = False) -> list[float]:
    """(a) The scratch step in plain PyTorch, no raykd code. `full_head`: HF's own forward with
    labels instead (LM head at every position), to tell the Trainer's cost from the head's."""
    torch.manual_seed(SEED)
    model = BertForMaskedLM(config).train()
    optimizer = torch.optim.AdamW(decay_groups(model), lr=lr, betas=BETAS, eps=EPS)
    times, last = [], time.perf_counter()
    for batch in itertools.islice(itertools.cycle(batches), steps):
        if full_head:
            loss = model(**batch).loss
        else:
            positions = batch["labels"] != -100
            hidden = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            loss = F.cross_entropy(model.cls(hidden[positions]), batch["labels"][positions])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        now = time.perf_counter()
        times.append(now - last)
        last = now
    return times


def hf_trainer_step_times(batches: list[dict], config: BertConfig, lr: float, steps: int, work: Path) -> tuple[list[float], str]:
    """(b) `transformers.Trainer` on the same pre-masked rows; returns step times and its optimizer."""
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    columns = {k: torch.cat([b[k] for b in batches]).numpy() for k in ("input_ids", "attention_mask", "labels")}
    dataset = Dataset.from_dict({k: list(v) for k, v in columns.items()}).with_format("torch")
    torch.manual_seed(SEED)
    model = BertForMaskedLM(config)
    args = TrainingArguments(
        output_dir=str(work / "hf_trainer"), per_device_train_batch_size=len(batches[0]["input_ids"]),
        gradient_accumulation_steps=1, max_steps=steps, learning_rate=lr, lr_scheduler_type="constant",
        adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS, weight_decay=WEIGHT_DECAY,
        max_grad_norm=MAX_GRAD_NORM, use_cpu=True, dataloader_num_workers=0, seed=SEED,
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none",
        disable_tqdm=True,  # the progress bar only clutters the table (it redraws at most ~10x/s)
    )
    clock = StepClock()
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[clock])
    trainer.train()
    if torch.get_num_threads() != THREADS:
        raise RuntimeError(f"Trainer changed torch threads to {torch.get_num_threads()}")
    return list(np.diff(clock.ends)), str(args.optim.value if hasattr(args.optim, "value") else args.optim)


def loop_step_times(batches: list[dict], shape, vocab_size: int, seq_len: int, lr: float, steps: int) -> list[float]:
    """(c') raykd's own single-process loop (`raykd.train.pretrain`) for scratch."""
    student = build_masked_lm(shape, vocab_size, seq_len, seed=SEED)
    strategy = build_strategy("scratch", shape, None, {})
    step_module = StudentStep(student, strategy).train()
    optimizer = make_optimizer(step_module, lr, BETAS, EPS, WEIGHT_DECAY)
    sequences, length = batches[0]["input_ids"].shape
    meter = BudgetMeter(steps * sequences * length, "tokens", devices=1)
    times, last = [], time.perf_counter()
    for _ in pretrain(step_module, strategy, itertools.cycle(batches), meter, optimizer, peak_lr=lr,
                      student_shape=shape, teacher_shape=None, vocab_size=vocab_size, max_grad_norm=MAX_GRAD_NORM):
        now = time.perf_counter()
        times.append(now - last)
        last = now
    return times


def ray_step_times(spec: TrialSpec, storage: Path, name: str) -> tuple[list[float], float]:
    """Per-step wall seconds of one Ray Train trial (device_seconds / devices held) and the run's wall time."""
    start = time.perf_counter()
    summary = run_pretraining(spec, str(storage), name)
    wall = time.perf_counter() - start
    rows = [row for row in summary["curve"] if not row.get("final")]
    device_seconds = np.array([row["device_seconds"] for row in rows])
    steps = np.array([row["steps"] for row in rows])
    if not np.array_equal(steps, np.arange(1, len(rows) + 1)):
        raise RuntimeError(f"{name}: curve rows are not one per step")
    return list(np.diff(device_seconds, prepend=0.0) / spec.devices()), wall


def timed(times: list[float], warmup: int) -> list[float]:
    if len(times) <= warmup:
        raise RuntimeError(f"only {len(times)} steps, warm-up is {warmup}")
    return times[warmup:]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per in-process round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of each run")
    parser.add_argument("--rounds", type=int, default=3, help="in-process rounds, interleaved with the Ray runs")
    parser.add_argument("--ray-steps", type=int, default=60, help=f"steps of each Ray run (first {RAY_WARMUP_STEPS} untimed)")
    parser.add_argument("--work-dir", default=None, help="where the corpus, teacher and Ray results go (default: temp)")
    args = parser.parse_args()
    if min(args.steps, args.rounds) < 1 or args.warmup < 0 or args.ray_steps <= RAY_WARMUP_STEPS:
        parser.error(f"need --steps >= 1, --rounds >= 1, --warmup >= 0 and --ray-steps > {RAY_WARMUP_STEPS}")
    if importlib.util.find_spec("accelerate") is None:
        parser.error("the HF Trainer needs the `accelerate` package (>= 1.1.0): pip install accelerate")
    started = time.perf_counter()
    torch.set_num_threads(THREADS)

    # Fixed shapes, not the local preset's (which may be resized for its time target):
    # the README's figures were measured with these.
    preset = load_config("local", overrides=["student={layers: 2, hidden: 128, heads: 4, intermediate: 512}",
                                             "teacher.shape={layers: 4, hidden: 256, heads: 4, intermediate: 1024}",
                                             "strategy_options.relation_heads=4", "train.lr=1e-3"])
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="step_overhead-"))
    try:
        result = measure(args, work, preset, started)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


def measure(args, work: Path, preset, started: float) -> dict:
    """Run every variant, print the table; returns the summary for the JSON line."""
    shape, teacher_shape = preset.student, preset.teacher.shape
    vocab, seq_len, batch_size = preset.data.vocab_size, preset.data.seq_len, preset.train.per_worker_batch
    lr, mask_prob = preset.train.lr, preset.data.mask_prob
    meta_path = prepare_corpus(work / "corpus", "synthetic", seed=SEED, num_documents=1200, validation_documents=40,
                               seq_len=seq_len, vocab_size=vocab)
    batches = masked_batches(meta_path, 8, batch_size, mask_prob)
    masked = int(sum((b["labels"] != -100).sum() for b in batches) / len(batches))
    teacher_dir = work / "teacher"
    build_masked_lm(teacher_shape, vocab, seq_len, seed=1).save_pretrained(teacher_dir)

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    meta = load_meta(meta_path)
    # The step is measured, not checkpointing or evaluation: one checkpoint and one validation
    # pass, both after the last step.
    study = replace(preset, budget_unit="tokens",
                    teacher=replace(preset.teacher, actors=1, actor_cpus=1.0),
                    train=replace(preset.train, workers=1, cpus_per_worker=1.0, gpus_per_worker=0.0,
                                  num_threads=THREADS, max_grad_norm=MAX_GRAD_NORM, precision="auto", compile=False,
                                  checkpoint_every=10 ** 9, eval_points=1, validation_examples=batch_size))
    cell = Cell("scratch", args.ray_steps * batch_size * seq_len, 1.0, SEED,
                unique_examples=min(1024, meta["splits"]["train"]["num_examples"]), lr=lr)
    spec = TrialSpec(study, cell, Corpus(str(meta_path), vocab, seq_len), teacher_dir=str(teacher_dir))

    def placed(placement: str):
        return replace(study, teacher=replace(study.teacher, placement=placement))

    ray_runs = [("scratch", spec),
                ("kd_colocated", replace(spec, config=placed("colocated"), cell=replace(cell, strategy="vanilla_kd"))),
                ("kd_actor", replace(spec, config=placed("actor"), cell=replace(cell, strategy="vanilla_kd")))]

    config = plain_bert_config(shape, vocab, seq_len)
    total = args.warmup + args.steps
    samples = {"bare": [], "bare_full_head": [], "hf_trainer": [], "loop": []}
    rounds = {key: [] for key in samples}
    ray_samples, ray_walls, hf_optim = {}, {}, ""
    for index in range(max(args.rounds, len(ray_runs))):
        if index < args.rounds:
            measured = {"bare": bare_step_times(batches, config, lr, total),
                        "bare_full_head": bare_step_times(batches, config, lr, total, full_head=True),
                        "loop": loop_step_times(batches, shape, vocab, seq_len, lr, total)}
            measured["hf_trainer"], hf_optim = hf_trainer_step_times(batches, config, lr, total, work)
            for key, times in measured.items():
                kept = timed(times, args.warmup)
                samples[key] += kept
                rounds[key].append(statistics.median(kept))
            print(f"round {index + 1}: " + "  ".join(f"{k} {1 / v[-1]:.2f}/s" for k, v in rounds.items()), flush=True)
        if index < len(ray_runs):
            key, run_spec = ray_runs[index]
            times, wall = ray_step_times(run_spec, work / "ray", f"{key}-{time.time_ns()}")
            ray_samples[key], ray_walls[key] = timed(times, RAY_WARMUP_STEPS), wall
            print(f"ray {key}: {len(times)} steps, median {1 / statistics.median(ray_samples[key]):.2f}/s, "
                  f"run wall {wall:.0f} s", flush=True)
    ray.shutdown()

    median = {k: statistics.median(v) for k, v in {**samples, **ray_samples}.items()}
    rate = {k: 1.0 / v for k, v in median.items()}
    scratch = build_strategy("scratch", shape, teacher_shape, preset.strategy_options)
    kd = build_strategy("vanilla_kd", shape, teacher_shape, preset.strategy_options)
    flop_ratio = (step_flops(kd, shape, teacher_shape, vocab, batch_size, seq_len, masked).total
                  / step_flops(scratch, shape, teacher_shape, vocab, batch_size, seq_len, masked).total)

    labels = {"bare": "(a) bare PyTorch loop", "bare_full_head": "(a') bare loop, HF forward with labels (full-vocab head)",
              "hf_trainer": f"(b) HF Trainer ({hf_optim}, full-vocab head)",
              "scratch": "(c) raykd Ray Train, 1 worker, scratch", "loop": "(c') raykd loop in-process, scratch",
              "kd_colocated": "(d) raykd vanilla_kd, teacher colocated",
              "kd_actor": "(e) raykd vanilla_kd, 1 teacher actor (shares the 2 cores)"}
    print(f"\nstudent {shape}, teacher {teacher_shape}, batch {batch_size} x {seq_len}, {masked} masked, "
          f"vocab {vocab}, {THREADS} threads; {args.rounds} rounds x {args.steps} steps in-process, "
          f"{args.ray_steps - RAY_WARMUP_STEPS} timed steps per Ray run")
    print(f"{'variant':<62} {'steps/s':>8} {'ms/step':>8} {'IQR ms':>13} {'n':>4}")
    for key in ("bare", "bare_full_head", "hf_trainer", "loop", "scratch", "kd_colocated", "kd_actor"):
        values = {**samples, **ray_samples}[key]
        q1, q3 = np.percentile(values, [25, 75]) * 1000
        print(f"{labels[key]:<62} {rate[key]:8.2f} {median[key] * 1000:8.1f} {q1:6.1f}-{q3:6.1f} {len(values):4d}")
    for key, values in rounds.items():
        print(f"  {key} per-round steps/s: " + ", ".join(f"{1 / v:.2f}" for v in values))
    print("  Ray run wall seconds (start-up included): " + ", ".join(f"{k} {v:.0f}" for k, v in ray_walls.items()))

    return {
        "bare_steps_per_s": round(rate["bare"], 3),
        "hf_trainer_steps_per_s": round(rate["hf_trainer"], 3),
        "bare_full_head_steps_per_s": round(rate["bare_full_head"], 3),
        "raykd_scratch_steps_per_s": round(rate["scratch"], 3),
        "raykd_loop_scratch_steps_per_s": round(rate["loop"], 3),
        "kd_colocated_steps_per_s": round(rate["kd_colocated"], 3),
        "kd_actor_steps_per_s": round(rate["kd_actor"], 3),
        "raykd_over_bare": round(rate["scratch"] / rate["bare"], 3),
        "raykd_over_hf_trainer": round(rate["scratch"] / rate["hf_trainer"], 3),
        "raykd_loop_over_bare": round(rate["loop"] / rate["bare"], 3),
        "hf_trainer_over_bare_full_head": round(rate["hf_trainer"] / rate["bare_full_head"], 3),
        "kd_colocated_over_scratch_step_time": round(median["kd_colocated"] / median["scratch"], 3),
        "kd_actor_over_scratch_step_time": round(median["kd_actor"] / median["scratch"], 3),
        "analytic_flop_ratio": round(flop_ratio, 3),
        "hf_trainer_optim": hf_optim,
        "targets": {
            "raykd_ge_0.97_bare": bool(rate["scratch"] >= 0.97 * rate["bare"]),
            "raykd_ge_hf_trainer": bool(rate["scratch"] >= rate["hf_trainer"]),
            "kd_colocated_le_1.05_flop_ratio": bool(median["kd_colocated"] / median["scratch"] <= 1.05 * flop_ratio),
        },
        "runtime_s": round(time.perf_counter() - started, 1),
    }


if __name__ == "__main__":
    sys.exit(main())
