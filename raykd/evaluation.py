"""GLUE-style evaluation of a pretrained student: fine-tune per task over an
lr x batch grid, keep the best dev score, report the official metrics.

One code path serves the real GLUE tasks (through `datasets`, by hub name or
from a local folder in the same format) and the embedded synthetic tasks
(JSONL in GLUE row format). Scores are on the GLUE leaderboard's 0-100 scale.
"""
import copy
import glob
import logging
import math
import os
from contextlib import contextmanager

import datasets
import numpy as np
import scipy.stats
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    get_polynomial_decay_schedule_with_warmup,
)

from raykd.task_specs import TASKS, TaskSpec  # noqa: F401  (the registry, re-exported)
from raykd.device import autocast, grad_scaler

GLUE_HUB_NAME = "nyu-mll/glue"
LABEL_COLUMN = "label"
WARMUP_FRACTION = 0.06
WEIGHT_DECAY = 0.01
EVAL_BATCH_SIZE = 128
LOCAL_FORMATS = (("jsonl", "json"), ("json", "json"), ("parquet", "parquet"), ("csv", "csv"))



def task_spec(task):
    """The registry entry of `task`; ValueError naming it and the known tasks."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[task]


# ---------------------------------------------------------------- data


def _split_files(task_dir, split):
    """Files of one split in a local task folder: `<split>.<ext>` or hub-style
    shards `<split>-*.<ext>`, first format found in LOCAL_FORMATS order."""
    for extension, builder in LOCAL_FORMATS:
        files = sorted(glob.glob(os.path.join(task_dir, f"{split}.{extension}")))
        files += sorted(glob.glob(os.path.join(task_dir, f"{split}-*.{extension}")))
        if files:
            return builder, files
    raise FileNotFoundError(
        f"{os.path.join(task_dir, split)}.jsonl not found "
        f"(looked for {split}.{{jsonl,json,parquet,csv}} and {split}-*.<ext> in {task_dir})"
    )


def load_task(task, data_dir=None):
    """Load a task's train and dev splits as a DatasetDict {"train", "validation"}.

    With data_dir, reads `<data_dir>/<task>/train.<ext>` and
    `<data_dir>/<task>/<dev split>.<ext>` (ext: jsonl, json, parquet or csv;
    the dev split is "validation", for MNLI "validation_matched"); without it,
    loads `datasets.load_dataset("nyu-mll/glue", task)` from the hub. The
    returned "validation" split is always the task's dev split (MNLI: matched).
    """
    spec = task_spec(task)
    if data_dir is None:
        if spec.embedded:
            raise ValueError(f"task {task!r} is embedded: pass data_dir, the folder of generated tasks")
        hub = datasets.load_dataset(GLUE_HUB_NAME, task)
        splits = {"train": hub["train"], "validation": hub[spec.dev_split]}
    else:
        task_dir = os.path.join(data_dir, task)
        splits = {}
        for name, split in (("train", "train"), ("validation", spec.dev_split)):
            builder, files = _split_files(task_dir, split)
            splits[name] = datasets.load_dataset(builder, data_files={split: files}, split=split)
    for name, split in splits.items():
        for column in (*spec.text_fields, LABEL_COLUMN):
            if column not in split.column_names:
                raise ValueError(
                    f"task {task!r}: {name} split has no column {column!r} "
                    f"(columns: {', '.join(split.column_names)})"
                )
    return datasets.DatasetDict(splits)


def _columns(split, names):
    """Whole columns as Python lists (indexing a `datasets` column row by row is slow)."""
    return split.select_columns(list(names))[:]


def _num_labels(task, spec, splits):
    """Classes of the task (1 for regression; counted from the data when the
    registry leaves it open), after checking the labels are numeric and, for
    classification, class ids in range."""
    labels = [np.asarray(_columns(splits[name], [LABEL_COLUMN])[LABEL_COLUMN]) for name in ("train", "validation")]
    for name, split in zip(("train", "validation"), labels):
        if not np.issubdtype(split.dtype, np.number):
            raise ValueError(f"task {task!r}: {name} column {LABEL_COLUMN!r} is not numeric ({split.dtype})")
    if spec.num_labels == 1:
        return 1
    num_labels = spec.num_labels or int(max(split.max() for split in labels)) + 1
    for name, split in zip(("train", "validation"), labels):
        bad = split[(split < 0) | (split >= num_labels) | (split != np.round(split))]
        if bad.size:
            raise ValueError(
                f"task {task!r}: {name} column {LABEL_COLUMN!r} holds {bad[0].item()!r}, "
                f"expected class ids 0..{num_labels - 1}"
            )
    return num_labels


def _subset(split, max_examples, seed):
    """A seeded random subset (GLUE files can be ordered by source or label)."""
    if max_examples is None or max_examples >= len(split):
        return split
    return split.shuffle(seed=seed).select(range(max_examples))


def _encode(tokenizer, split, text_fields, max_seq_len, regression):
    """(input ids, token type ids) per example, unpadded, and the label tensor."""
    columns = _columns(split, (*text_fields, LABEL_COLUMN))
    # transformers 5 leaves token types out unless asked, even for BERT-style pairs.
    encoded = tokenizer(
        *(columns[field] for field in text_fields),
        truncation=True,
        max_length=max_seq_len,
        return_token_type_ids=True,
    )
    labels = torch.tensor(columns[LABEL_COLUMN], dtype=torch.float32 if regression else torch.long)
    return list(zip(encoded["input_ids"], encoded["token_type_ids"])), labels


def _collate(examples, pad_id, device):
    """Pad one batch to its longest example (dynamic padding)."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    token_type_ids = torch.zeros((len(examples), width), dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, types) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        token_type_ids[row, : len(ids)] = torch.tensor(types)
        attention_mask[row, : len(ids)] = 1
    batch = {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}
    return {name: tensor.to(device) for name, tensor in batch.items()}


# ---------------------------------------------------------------- metrics


def _correlation(function, predictions, labels):
    # An undefined correlation (constant input) counts as no correlation,
    # as scikit-learn does for the Matthews coefficient.
    if np.ptp(predictions) == 0 or np.ptp(labels) == 0:
        return 0.0
    return float(function(predictions, labels)[0])


def task_score(task, predictions, labels):
    """The task's official GLUE metric on the 0-100 leaderboard scale.

    predictions are class ids (regression: real values), labels the gold
    labels. Returns (score, details) where details holds each metric that
    enters the score, also on 0-100: CoLA Matthews corr.; MRPC/QQP mean of
    F1 (positive class 1) and accuracy; STS-B mean of Pearson and Spearman;
    the rest accuracy.
    """
    metric = task_spec(task).metric
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape or predictions.ndim != 1 or len(labels) == 0:
        raise ValueError(
            f"task {task!r}: predictions {predictions.shape} and labels {labels.shape} "
            "must be non-empty 1-d arrays of equal length"
        )
    if metric == "pearson_spearman":
        details = {
            "pearson": 100 * _correlation(scipy.stats.pearsonr, predictions, labels),
            "spearman": 100 * _correlation(scipy.stats.spearmanr, predictions, labels),
        }
    elif metric == "mcc":
        details = {"matthews_correlation": 100 * float(matthews_corrcoef(labels, predictions))}
    elif metric == "f1_accuracy":
        details = {
            "f1": 100 * float(f1_score(labels, predictions, pos_label=1, zero_division=0.0)),
            "accuracy": 100 * float(accuracy_score(labels, predictions)),
        }
    else:
        details = {"accuracy": 100 * float(accuracy_score(labels, predictions))}
    return float(np.mean(list(details.values()))), details


# ---------------------------------------------------------------- fine-tuning


def _drop_load_report(record):
    return "LOAD REPORT" not in record.getMessage()


@contextmanager
def _quiet_load_report():
    """Drop transformers' load report (`load_student_classifier` checks the
    keys itself). A filter, not a log level: transformers changes what it
    checks when that logger's level is raised."""
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addFilter(_drop_load_report)
    try:
        yield
    finally:
        logger.removeFilter(_drop_load_report)


def load_student_classifier(student_dir, num_labels, seed=0):
    """The student as a sequence classifier (num_labels 1: regression) with a
    fresh, seeded head; ValueError if any encoder weight is not in the checkpoint."""
    problem_type = "regression" if num_labels == 1 else "single_label_classification"
    torch.manual_seed(seed)
    with _quiet_load_report():
        model, info = AutoModelForSequenceClassification.from_pretrained(
            student_dir, num_labels=num_labels, problem_type=problem_type, output_loading_info=True,
            attn_implementation="sdpa",  # fused attention: fine-tuning never reads attention weights
        )
    # The head (and the pooler, which an MLM checkpoint does not train) is new;
    # anything else missing means the encoder was not loaded.
    new_prefixes = ("classifier.", f"{model.base_model_prefix}.pooler.")
    missing = sorted(key for key in info["missing_keys"] if not key.startswith(new_prefixes))
    if missing:
        raise ValueError(
            f"student_dir {student_dir}: checkpoint lacks encoder weights {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}"
        )
    return model


def _optimizer(model, learning_rate):
    from raykd.train import make_optimizer  # here: raykd.train imports Ray, and config validation imports this module

    # torch's default betas/eps for fine-tuning. The fused kernel runs on CPU too, and was ~10x faster
    # than the default per-step update on a tiny student, where the update is a large share of a step.
    return make_optimizer(model, learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=WEIGHT_DECAY, fused=True)


def _loss(logits, labels):
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1), labels)
    return F.cross_entropy(logits, labels)


@torch.inference_mode()
def _predict(model, examples, pad_id, device, precision="fp32"):
    """Dev-set predictions, batched by length to keep padding small."""
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    outputs = [None] * len(examples)
    for start in range(0, len(order), EVAL_BATCH_SIZE):
        indices = order[start : start + EVAL_BATCH_SIZE]
        with autocast(precision, device):
            logits = model(**_collate([examples[i] for i in indices], pad_id, device)).logits.float()
        values = logits.squeeze(-1) if logits.shape[-1] == 1 else logits.argmax(-1)
        for i, value in zip(indices, values.tolist()):
            outputs[i] = value
    return np.asarray(outputs)


def _train_cell(pristine, task, train, dev, pad_id, learning_rate, batch_size, epochs, seed, device, precision):
    """Fine-tune a copy of the student with one (lr, batch) setting; the dev
    (score, details) after each epoch."""
    model = copy.deepcopy(pristine).to(device)
    torch.manual_seed(seed)  # dropout
    order_generator = torch.Generator().manual_seed(seed)
    train_examples, train_labels = train
    train_labels = train_labels.to(device)
    dev_examples, dev_labels = dev
    steps_per_epoch = math.ceil(len(train_examples) / batch_size)
    total_steps = epochs * steps_per_epoch
    optimizer = _optimizer(model, learning_rate)
    # Polynomial decay of power 1 to zero, as in the paper's fine-tuning.
    schedule = get_polynomial_decay_schedule_with_warmup(
        optimizer, round(WARMUP_FRACTION * total_steps), total_steps, lr_end=0.0, power=1.0
    )
    scaler = grad_scaler(precision, device)
    epoch_results = []
    for _ in range(epochs):
        model.train()
        permutation = torch.randperm(len(train_examples), generator=order_generator).tolist()
        for start in range(0, len(permutation), batch_size):
            indices = permutation[start : start + batch_size]
            batch = _collate([train_examples[i] for i in indices], pad_id, device)
            with autocast(precision, device):
                loss = _loss(model(**batch).logits, train_labels[torch.tensor(indices, device=device)])
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        predictions = _predict(model, dev_examples, pad_id, device, precision)
        epoch_results.append(task_score(task, predictions, dev_labels.numpy()))
    return epoch_results


def _check_grid(learning_rates, batch_sizes, epochs, max_seq_len, max_train_examples, max_eval_examples):
    # YAML reads "1e-5" (no dot) as a string: refuse it here rather than mid-grid.
    if not learning_rates or any(isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0
                                 for lr in learning_rates):
        raise ValueError(f"learning_rates must be a non-empty list of positive numbers, got {learning_rates!r}")
    if not batch_sizes or any(not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes must be a non-empty list of positive integers, got {batch_sizes!r}")
    for name, value in (("epochs", epochs), ("max_seq_len", max_seq_len)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name, value in (("max_train_examples", max_train_examples), ("max_eval_examples", max_eval_examples)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be None or a positive integer, got {value!r}")


def _check_checkpoints(student_dir, tokenizer_dir, max_seq_len):
    required = (("student_dir", os.path.join(student_dir, "config.json")), ("tokenizer_dir", tokenizer_dir))
    for name, path in required:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{name}: {path} not found")
    max_positions = AutoConfig.from_pretrained(student_dir).max_position_embeddings
    if max_seq_len > max_positions:
        raise ValueError(
            f"max_seq_len {max_seq_len} exceeds the student's max_position_embeddings {max_positions}"
        )


@contextmanager
def _torch_threads(num_threads):
    """Run with num_threads intra-op threads (Ray workers default to one)."""
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def finetune_task(
    student_dir,
    tokenizer_dir,
    task,
    *,
    data_dir=None,
    learning_rates=(1e-5, 3e-5, 5e-5, 8e-5),
    batch_sizes=(16, 32),
    epochs=5,
    max_seq_len=128,
    seed=0,
    max_train_examples=None,
    max_eval_examples=None,
    num_threads=None,
    device=None,
    precision="auto",
):
    """Fine-tune a pretrained student on one task over the lr x batch grid and
    keep the best dev score over all cells and epochs.

    student_dir is an HF `save_pretrained` masked-LM checkpoint; it gets a new
    classification (or, for STS-B-like tasks, regression) head. Each cell
    trains with AdamW (weight decay 0.01) and a linear (polynomial, power 1)
    decay to zero after 6 % warmup, and is scored on the dev split after each
    epoch. Training is seeded: equal arguments give equal scores (on CPU;
    GPU kernels need not be bitwise deterministic). max_*_examples take a
    seeded random subset of a split. num_threads sets torch's CPU threads for
    the call; device defaults to CUDA when available, else CPU; precision is
    `train.precision` (see raykd.device: "auto" is bf16 autocast on CUDA, fp32 on CPU).

    Returns {"task", "score" (0-100), "details" (the metrics of the best
    cell-epoch), "best_lr", "best_batch_size", "best_epoch" (1-based),
    "num_labels", "num_train_examples", "num_eval_examples", "grid"};
    "grid" lists per cell {"learning_rate", "batch_size", "epoch_scores",
    "epoch_details", "best_score"}.
    """
    spec = task_spec(task)
    _check_grid(learning_rates, batch_sizes, epochs, max_seq_len, max_train_examples, max_eval_examples)
    _check_checkpoints(student_dir, tokenizer_dir, max_seq_len)
    splits = load_task(task, data_dir)
    num_labels = _num_labels(task, spec, splits)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tokenizer.pad_token_id is None:
        raise ValueError(f"tokenizer_dir {tokenizer_dir}: tokenizer has no pad token")
    train, dev = (
        _encode(tokenizer, _subset(splits[name], limit, seed), spec.text_fields, max_seq_len, num_labels == 1)
        for name, limit in (("train", max_train_examples), ("validation", max_eval_examples))
    )
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    with _torch_threads(num_threads):
        pristine = load_student_classifier(student_dir, num_labels, seed)
        grid = []
        for learning_rate in learning_rates:
            for batch_size in batch_sizes:
                epoch_results = _train_cell(
                    pristine, task, train, dev, tokenizer.pad_token_id,
                    learning_rate, batch_size, epochs, seed, device, precision,
                )
                epoch_scores = [score for score, _ in epoch_results]
                grid.append(
                    {
                        "learning_rate": learning_rate,
                        "batch_size": batch_size,
                        "epoch_scores": epoch_scores,
                        "epoch_details": [details for _, details in epoch_results],
                        "best_score": max(epoch_scores),
                    }
                )
    best = max(grid, key=lambda cell: cell["best_score"])  # first cell wins ties
    best_epoch = best["epoch_scores"].index(best["best_score"]) + 1
    return {
        "task": task,
        "score": best["best_score"],
        "details": best["epoch_details"][best_epoch - 1],
        "best_lr": best["learning_rate"],
        "best_batch_size": best["batch_size"],
        "best_epoch": best_epoch,
        "num_labels": num_labels,
        "num_train_examples": len(train[0]),
        "num_eval_examples": len(dev[0]),
        "grid": grid,
    }


def chance_score(task, data_dir=None, *, max_eval_examples=None, seed=0):
    """The task's chance level: the best score of a constant prediction over the classes seen in training
    (majority-class accuracy, MCC 0, F1 and accuracy of all-positive on a balanced pair task); 0 for a
    regression, whose correlations with a constant are 0. A student at this level has learned nothing."""
    spec = task_spec(task)
    splits = load_task(task, data_dir)
    if _num_labels(task, spec, splits) == 1:
        return 0.0
    train = np.asarray(_columns(splits["train"], [LABEL_COLUMN])[LABEL_COLUMN])
    dev = np.asarray(_columns(_subset(splits["validation"], max_eval_examples, seed), [LABEL_COLUMN])[LABEL_COLUMN])
    return max(task_score(task, np.full(len(dev), label), dev)[0] for label in np.unique(train.astype(int)))


def evaluate_student(student_dir, tokenizer_dir, tasks, **finetune_options):
    """Fine-tune and score a student on each task (see `finetune_task`).

    All task names and files are checked before any fine-tuning starts.
    Returns {"scores": {task: score}, "glue_score": mean of the task scores,
    "tasks": {task: finetune_task result}}.
    """
    tasks = list(tasks)
    if not tasks:
        raise ValueError("tasks must name at least one task")
    for task in tasks:
        task_spec(task)
    data_dir = finetune_options.get("data_dir")
    for task in tasks:
        load_task(task, data_dir)  # fail on a missing file before compute is spent
    results = {task: finetune_task(student_dir, tokenizer_dir, task, **finetune_options) for task in tasks}
    scores = {task: result["score"] for task, result in results.items()}
    return {"scores": scores, "glue_score": float(np.mean(list(scores.values()))), "tasks": results}
