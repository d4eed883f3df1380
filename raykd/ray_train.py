"""One pretraining trial on Ray Train: N DDP workers, teacher actors, checkpoints, resume.

`run_pretraining(spec, storage_path, name)` is where a trial starts: it
creates the teacher actors (unless the teacher is colocated), launches a
`TorchTrainer` whose workers each run `worker_loop`, and returns the trial's
summary (ledger, data counts, MLM validation loss, student path). Each worker
reads its own slice of the data stream, asks the teacher for batch k+1 before
running step k, and charges the global step through `raykd.budget`, so all
workers stop at the same step.

Every `checkpoint_every` steps rank 0 writes the student (HF format), the
strategy's projection heads, the optimizer, the ledger and the data position
(the step); a worker that dies is restarted by Ray Train from the last
checkpoint, and a teacher actor that dies is restarted by Ray with its
pending call retried. Re-running the same `name` at the same storage resumes.
"""
from __future__ import annotations

import collections
import io
import json
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train.torch import TorchConfig, TorchTrainer
from transformers import AutoModelForMaskedLM

from raykd import storage
from raykd.budget import BudgetMeter, Ledger
from raykd.data.stream import PretrainStream, validation_batches
from raykd.device import device_name, enable_tf32, resolve_precision
from raykd.models import ModelShape, build_masked_lm
from raykd.strategies import build_strategy, needs_teacher
from raykd.teacher import ActorTeacher, ColocatedTeacher, LocalTeacher, model_folder, start_teacher_actors
from raykd.train import StudentStep, derived_seed, make_optimizer, pretrain, validation_losses

STATE_FILE = "state.json"
CURVE_FILE = "curve.jsonl"
COUNTS_FILE = "example_counts.npy"


@dataclass
class TrialSpec:
    """Everything one pretraining trial needs, as plain values (it travels to Ray workers)."""

    strategy: str
    budget: float
    budget_unit: str
    meta_path: str
    unique_examples: int
    seed: int  # data order, masks and the student's initialisation
    student: dict  # ModelShape fields
    vocab_size: int
    seq_len: int
    peak_lr: float
    teacher_dir: str | None = None
    teacher_shape: dict | None = None
    teacher_placement: str = "actor"
    teacher_actors: int = 1
    teacher_actor_cpus: float = 1.0
    teacher_actor_gpus: float = 0.0
    teacher_dtype: str = "float32"
    strategy_options: dict = field(default_factory=dict)
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    num_threads: int = 1
    per_worker_batch: int = 32
    mask_prob: float = 0.15
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    dropout: float = 0.1
    precision: str = "auto"
    compile: bool = False
    checkpoint_every: int = 50
    eval_points: int = 4
    validation_examples: int = 256
    max_failures: int = 3
    audit_examples: bool = False  # keep per-example counts (tests; one int per pool example)

    def student_shape(self) -> ModelShape:
        return ModelShape(**self.student)

    def teacher_model_shape(self) -> ModelShape | None:
        return ModelShape(**self.teacher_shape) if self.teacher_shape else None

    def uses_teacher(self) -> bool:
        return needs_teacher(self.strategy)

    def actor_count(self) -> int:
        return self.teacher_actors if self.uses_teacher() and self.teacher_placement == "actor" else 0

    def devices(self) -> int:
        """Devices the trial holds: training workers plus teacher actors (the device_seconds charge)."""
        return self.workers + self.actor_count()


def _build(spec: TrialSpec):
    student_shape, teacher_shape = spec.student_shape(), spec.teacher_model_shape()
    with torch.random.fork_rng(devices=[]):  # projection heads: drawn from the trial's seed, not the process's RNG
        torch.manual_seed(derived_seed(spec.seed, "strategy"))
        strategy = build_strategy(spec.strategy, student_shape, teacher_shape, spec.strategy_options)
    # Same seed, same initial student for every strategy in a grid cell.
    student = build_masked_lm(student_shape, spec.vocab_size, spec.seq_len, seed=spec.seed, dropout=spec.dropout)
    return student, strategy


def worker_loop(config: dict) -> None:
    """The body of every Ray Train worker: restore, stream, train to the budget, checkpoint."""
    spec = TrialSpec(**config["spec"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(spec.num_threads)  # Ray sets OMP_NUM_THREADS=1 in workers
    device = torch.device("cuda", torch.cuda.current_device()) if spec.gpus_per_worker and torch.cuda.is_available() else torch.device("cpu")
    precision = resolve_precision(spec.precision, device)
    if device.type == "cuda":
        enable_tf32()

    student, strategy = _build(spec)
    plain_module = step_module = StudentStep(student, strategy).to(device)
    optimizer = make_optimizer(step_module, spec.peak_lr, tuple(spec.betas), spec.eps, spec.weight_decay)
    meter = BudgetMeter(spec.budget, spec.budget_unit, devices=spec.devices())
    curve, counts, restored = [], None, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            curve, counts, restored = _restore(Path(folder), step_module, optimizer, meter)
        restored.append(meter.ledger.steps)  # the steps this trial was restored at, kept in its checkpoints
    if spec.audit_examples and counts is None:
        counts = {}

    stream = PretrainStream(spec.meta_path, unique_examples=spec.unique_examples, seed=spec.seed,
                            per_worker_batch=spec.per_worker_batch, rank=rank, world_size=world,
                            mask_prob=spec.mask_prob)
    needs = strategy.teacher_needs()
    teacher = None
    if needs is not None and spec.teacher_placement == "actor":
        teacher = ActorTeacher(config["teacher_actors"], needs, rank=rank, device=str(device))
    elif needs is not None:
        model = AutoModelForMaskedLM.from_pretrained(model_folder(spec.teacher_dir)).to(device)
        teacher = ColocatedTeacher(LocalTeacher(model, needs, torch.float32 if device.type == "cpu" else torch.bfloat16,
                                                precision))

    if world > 1:
        step_module = torch.nn.parallel.DistributedDataParallel(step_module, find_unused_parameters=True)

        def reduce_sum(values):
            values = values.clone()
            dist.all_reduce(values)
            return values
    else:
        def reduce_sum(values):
            return values
    if spec.compile:
        step_module = torch.compile(step_module)

    fetched = collections.deque()  # example ids of batches handed to the loop, not yet trained on
    batches = (_to(batch, device) for batch in _remembered(stream.batches(start_step=meter.ledger.steps), fetched))
    eval_marks = [k / spec.eval_points for k in range(1, spec.eval_points)]
    latest = {"mlm_val_loss": math.nan, "val_loss": math.nan}
    next_mark = sum(1 for m in eval_marks if meter.fraction >= m)
    for report in pretrain(step_module, strategy, batches, meter, optimizer, peak_lr=spec.peak_lr,
                           student_shape=spec.student_shape(), teacher_shape=spec.teacher_model_shape(),
                           vocab_size=spec.vocab_size, teacher=teacher, reduce_sum=reduce_sum,
                           world_size=world, max_grad_norm=spec.max_grad_norm, precision=precision,
                           dropout_seed=derived_seed(spec.seed, "dropout", rank)):
        trained = fetched.popleft()  # the loop prefetches one batch ahead
        if counts is not None:
            for example in trained.tolist():
                counts[example] = counts.get(example, 0) + 1
        row = {"step": report.step, "budget_fraction": report.fraction, "lr": report.lr, "loss": report.loss,
               **report.parts, **report.ledger, "mlm_val_loss": math.nan, "val_loss": math.nan}
        evaluate = next_mark < len(eval_marks) and report.fraction >= eval_marks[next_mark]
        if evaluate:
            next_mark += 1
            row.update(_validation(plain_module, teacher, spec, rank, device, precision))
            latest = {k: row[k] for k in ("mlm_val_loss", "val_loss")}
        curve.append(row)
        if evaluate or report.step % spec.checkpoint_every == 0:
            # Tune (ASHA) sees the latest validation losses at every report, not NaN between points.
            _report({**row, **latest}, spec, rank, step_module, optimizer, meter, curve, counts, restored, stream,
                    final=False)
    row = {**(curve[-1] if curve else {}), **meter.ledger.to_dict(), "budget_fraction": meter.fraction}
    row.update(_validation(plain_module, teacher, spec, rank, device, precision))
    curve.append({**row, "final": True})
    _report(row, spec, rank, step_module, optimizer, meter, curve, counts, restored, stream, final=True)


def _to(batch: dict, device) -> dict:
    return batch if device.type == "cpu" else {k: v.to(device) for k, v in batch.items()}


def _remembered(batches, fetched: collections.deque):
    """Pass batches through, remembering their example ids in order."""
    for batch in batches:
        fetched.append(batch["example_id"])
        yield batch


def _validation(step_module, teacher, spec: TrialSpec, rank: int, device, precision: str) -> dict:
    """Validation losses on fixed masks, computed on rank 0 (the others report NaN)."""
    if rank != 0:
        return {"mlm_val_loss": math.nan, "val_loss": math.nan}
    batches = validation_batches(spec.meta_path, spec.per_worker_batch, spec.seed, max_examples=spec.validation_examples)
    return validation_losses(step_module, (_to(b, device) for b in batches), teacher, precision)


def _report(row, spec, rank, step_module, optimizer, meter, curve, counts, restored, stream, *, final: bool) -> None:
    """Every worker reports (a barrier); rank 0 attaches the checkpoint."""
    steps = meter.ledger.steps
    metrics = {**{k: v for k, v in row.items() if isinstance(v, (int, float, bool))},
               "unique_tokens": stream.unique_tokens, "tokens_seen": stream.tokens_seen(steps),
               "epochs": stream.epochs_at(steps), "final": final}
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0 or counts is not None:  # audit counts: every rank writes its own file
            _save(Path(folder), rank, step_module, optimizer, meter, curve, counts, restored)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)


def _save(folder: Path, rank: int, step_module, optimizer, meter, curve, counts, restored) -> None:
    if counts is not None:
        ids = np.fromiter(counts.keys(), dtype=np.int64)
        np.save(folder / f"rank{rank}-{COUNTS_FILE}", np.stack([ids, np.fromiter(counts.values(), dtype=np.int64)]))
    if rank != 0:
        return
    module = getattr(step_module, "module", step_module)
    module.student.save_pretrained(folder / "student")
    torch.save({"strategy": module.strategy.state_dict(), "optimizer": optimizer.state_dict()}, folder / "training.pt")
    (folder / STATE_FILE).write_text(json.dumps({"ledger": meter.ledger.to_dict(),
                                                 "last_step_seconds": meter.last_step_seconds,
                                                 "restored_from": restored,
                                                 "device": device_name(next(module.parameters()).device)}))
    with open(folder / CURVE_FILE, "w") as out:
        for row in curve:
            out.write(json.dumps(row) + "\n")


def _restore(folder: Path, step_module, optimizer, meter):
    """Load a checkpoint written by `_save`; returns the curve so far, the audit counts and the
    steps the trial was restored at before."""
    module = step_module
    state = torch.load(folder / "training.pt", weights_only=True)  # tensors and plain values only: loading runs no code
    loaded = AutoModelForMaskedLM.from_pretrained(folder / "student")
    module.student.load_state_dict(loaded.state_dict())
    module.strategy.load_state_dict(state["strategy"])
    optimizer.load_state_dict(state["optimizer"])
    saved = json.loads((folder / STATE_FILE).read_text())
    meter.ledger = Ledger(**saved["ledger"])
    meter.last_step_seconds = saved["last_step_seconds"]
    curve = [json.loads(line) for line in (folder / CURVE_FILE).read_text().splitlines() if line]
    own = folder / f"rank{ray.train.get_context().get_world_rank()}-{COUNTS_FILE}"
    counts = None
    if own.exists():
        ids, values = np.load(own)
        counts = dict(zip(ids.tolist(), values.tolist()))
    return curve, counts, saved["restored_from"]


def run_pretraining(spec: TrialSpec, storage_path: str, name: str, callbacks: list | None = None) -> dict:
    """Run (or resume) one pretraining trial; returns its summary and the final student's path."""
    actors = []
    if spec.actor_count():
        strategy = _build(spec)[1]
        actors = start_teacher_actors(spec.teacher_dir, strategy.teacher_needs(), count=spec.actor_count(),
                                      cpus=spec.teacher_actor_cpus, gpus=spec.teacher_actor_gpus,
                                      dtype=spec.teacher_dtype, num_threads=spec.num_threads,
                                      precision=spec.precision)
    use_gpu = spec.gpus_per_worker > 0
    resources = {"CPU": spec.cpus_per_worker, **({"GPU": spec.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"spec": asdict(spec), "teacher_actors": actors},
        scaling_config=ray.train.ScalingConfig(num_workers=spec.workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path, callbacks=callbacks or [],
            failure_config=ray.train.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        result = trainer.fit()
    finally:
        for actor in actors:
            ray.kill(actor)
    return summarise(storage.uri_of(storage_path, result.checkpoint.path), result.metrics, spec)


def summarise(checkpoint: str, metrics: dict, spec: TrialSpec) -> dict:
    """The trial's row: ledger in every unit, data counts, losses and where the student is.

    `checkpoint` is the final checkpoint's URI in the storage; only its small files are read
    here, and the student stays there (its URI is the row's `checkpoint`).
    """
    state = json.loads(storage.read_text(storage.join(checkpoint, STATE_FILE)))
    curve = [json.loads(line) for line in storage.read_text(storage.join(checkpoint, CURVE_FILE)).splitlines() if line]
    summary = {**state["ledger"], "unique_tokens": metrics["unique_tokens"], "tokens_seen": metrics["tokens_seen"],
               "epochs": metrics["epochs"], "mlm_val_loss": curve[-1]["mlm_val_loss"],
               "kd_loss": curve[-1].get("kd_loss", math.nan), "checkpoint": storage.join(checkpoint, "student"),
               "device": state.get("device"), "curve": curve, "restored_from": state["restored_from"]}
    if spec.audit_examples:
        totals = {}
        for uri in storage.list_files(checkpoint, f"-{COUNTS_FILE}"):
            ids, values = np.load(io.BytesIO(storage.read_bytes(uri)))
            for example, value in zip(ids.tolist(), values.tolist()):
                totals[example] = totals.get(example, 0) + value
        summary["example_counts"] = totals
    return summary
