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
from dataclasses import dataclass
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
from raykd.config import StudyConfig
from raykd.models import build_masked_lm
from raykd.plan import Cell
from raykd.strategies import build_strategy, needs_teacher
from raykd.teacher import ActorTeacher, ColocatedTeacher, LocalTeacher, model_folder, start_teacher_actors
from raykd.train import StudentStep, derived_seed, make_optimizer, pretrain, validation_losses

STATE_FILE = "state.json"
CURVE_FILE = "curve.jsonl"
COUNTS_FILE = "example_counts.npy"


@dataclass(frozen=True)
class Corpus:
    """A prepared corpus as trials reach it: its meta.json (a storage URI or a path every worker
    reads) and what the models need of it."""

    meta_path: str
    vocab_size: int
    seq_len: int

    @classmethod
    def of(cls, meta_path: str, meta: dict) -> "Corpus":
        return cls(str(meta_path), meta["vocab_size"], meta["seq_len"])


@dataclass(frozen=True)
class TrialSpec:
    """One pretraining trial: the study's validated configuration, the cell it runs, and where its
    inputs are. It travels as it is (typed, pickled) to the Ray Train workers.

    The trial trains `config.student` with `cell.strategy` to `cell.budget` (in `config.budget_unit`)
    at peak LR `cell.lr`, on `cell.unique_examples` of the corpus chosen by `cell.seed`.
    """

    config: StudyConfig
    cell: Cell
    corpus: Corpus
    teacher_dir: str | None = None  # a storage URI, a path or a hub name; None for a strategy without one
    audit_examples: bool = False  # keep per-example counts (tests; one int per pool example)
    max_failures: int = 3

    def actor_count(self) -> int:
        """Teacher actors the trial starts (none for a colocated teacher or a strategy without one)."""
        teacher = self.config.teacher
        return teacher.actors if needs_teacher(self.cell.strategy) and teacher.placement == "actor" else 0

    def devices(self) -> int:
        """Devices the trial holds: training workers plus teacher actors (the device_seconds charge)."""
        return self.config.train.workers + self.actor_count()


def build_trial(spec: TrialSpec):
    """The trial's initial student and its strategy (with any projection heads), both from its seed."""
    config = spec.config
    with torch.random.fork_rng(devices=[]):  # projection heads: drawn from the trial's seed, not the process's RNG
        torch.manual_seed(derived_seed(spec.cell.seed, "strategy"))
        strategy = build_strategy(spec.cell.strategy, config.student, config.teacher.shape, config.strategy_options)
    # Same seed, same initial student for every strategy in a grid cell.
    student = build_masked_lm(config.student, spec.corpus.vocab_size, spec.corpus.seq_len, seed=spec.cell.seed,
                              dropout=config.train.dropout)
    return student, strategy


def worker_loop(config: dict) -> None:
    """The body of every Ray Train worker: restore, stream, train to the budget, checkpoint."""
    spec: TrialSpec = config["spec"]
    train, cell = spec.config.train, spec.cell
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(train.num_threads)  # Ray sets OMP_NUM_THREADS=1 in workers
    device = torch.device("cuda", torch.cuda.current_device()) if train.gpus_per_worker and torch.cuda.is_available() else torch.device("cpu")
    precision = resolve_precision(train.precision, device)
    if device.type == "cuda":
        enable_tf32()

    student, strategy = build_trial(spec)
    plain_module = step_module = StudentStep(student, strategy).to(device)
    optimizer = make_optimizer(step_module, cell.lr, tuple(train.betas), train.eps, train.weight_decay)
    meter = BudgetMeter(cell.budget, spec.config.budget_unit, devices=spec.devices())
    curve, counts, restored = [], None, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            curve, counts, restored = _restore(Path(folder), step_module, optimizer, meter)
        restored.append(meter.ledger.steps)  # the steps this trial was restored at, kept in its checkpoints
    if spec.audit_examples and counts is None:
        counts = {}

    stream = PretrainStream(spec.corpus.meta_path, unique_examples=cell.unique_examples, seed=cell.seed,
                            per_worker_batch=train.per_worker_batch, rank=rank, world_size=world,
                            mask_prob=spec.config.data.mask_prob)
    needs = strategy.teacher_needs()
    teacher = None
    if needs is not None and spec.config.teacher.placement == "actor":
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
    if train.compile:
        step_module = torch.compile(step_module)

    fetched = collections.deque()  # example ids of batches handed to the loop, not yet trained on
    batches = (_to(batch, device) for batch in _remembered(stream.batches(start_step=meter.ledger.steps), fetched))
    eval_marks = [k / train.eval_points for k in range(1, train.eval_points)]
    latest = {"mlm_val_loss": math.nan, "val_loss": math.nan}
    next_mark = sum(1 for m in eval_marks if meter.fraction >= m)
    for report in pretrain(step_module, strategy, batches, meter, optimizer, peak_lr=cell.lr,
                           student_shape=spec.config.student, teacher_shape=spec.config.teacher.shape,
                           vocab_size=spec.corpus.vocab_size, teacher=teacher, reduce_sum=reduce_sum,
                           world_size=world, max_grad_norm=train.max_grad_norm, precision=precision,
                           dropout_seed=derived_seed(cell.seed, "dropout", rank)):
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
        if evaluate or report.step % train.checkpoint_every == 0:
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
    train = spec.config.train
    batches = validation_batches(spec.corpus.meta_path, train.per_worker_batch, spec.cell.seed,
                                 max_examples=train.validation_examples, mask_prob=spec.config.data.mask_prob)
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
    train, teacher = spec.config.train, spec.config.teacher
    if spec.actor_count():
        strategy = build_trial(spec)[1]
        actors = start_teacher_actors(spec.teacher_dir, strategy.teacher_needs(), count=spec.actor_count(),
                                      cpus=teacher.actor_cpus, gpus=teacher.actor_gpus, dtype=teacher.dtype,
                                      num_threads=train.num_threads, precision=train.precision)
    use_gpu = train.gpus_per_worker > 0
    resources = {"CPU": train.cpus_per_worker, **({"GPU": train.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"spec": spec, "teacher_actors": actors},
        scaling_config=ray.train.ScalingConfig(num_workers=train.workers, use_gpu=use_gpu, resources_per_worker=resources),
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
