"""Data stream throughput against what training consumes (SPEC §9: the stream must be >= 10x).

Builds a random corpus of a few thousand examples in the shard format, reads
it through `PretrainStream` (Ray Data: read, order, masking, batching) at the
smoke preset's per-worker batch, and times the smoke-preset student's
`scratch` training step (raykd's own step, at the preset's thread count).
The last line printed is one JSON object with both rates and their ratio.

    python bench/data_throughput.py [--preset smoke] [--examples 4000] [--batches 6000]
"""
import argparse
import json
import os
import tempfile
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from raykd.config import load_config
from raykd.data.stream import PretrainStream
from raykd.models import build_masked_lm
from raykd.strategies.scratch import Scratch
from raykd.train import StudentStep, make_optimizer, prepare_batch

SPECIALS = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}


def write_random_corpus(root: Path, num_examples: int, seq_len: int, vocab_size: int, per_shard: int = 1000) -> Path:
    """A train split of random token rows ([CLS] … [SEP]) in the shard format; returns meta.json."""
    rng = np.random.default_rng(0)
    (root / "train").mkdir(parents=True)
    shards = []
    for first in range(0, num_examples, per_shard):
        rows = rng.integers(len(SPECIALS), vocab_size, (min(per_shard, num_examples - first), seq_len), dtype=np.int32)
        rows[:, 0], rows[:, -1] = SPECIALS["cls"], SPECIALS["sep"]
        path = f"train/shard-{len(shards):05d}.parquet"
        pq.write_table(pa.table({"example_id": pa.array(np.arange(first, first + len(rows)), pa.int64()),
                                 "input_ids": pa.array(list(rows), pa.list_(pa.int32()))}), root / path)
        shards.append({"path": path, "num_examples": len(rows), "first_example_id": first})
    meta = {"seq_len": seq_len, "vocab_size": vocab_size, "special_ids": SPECIALS, "tokenizer": "none",
            "corpus": {"source": "random"},
            "splits": {"train": {"num_examples": num_examples, "num_tokens": num_examples * seq_len, "shards": shards}}}
    (root / "meta.json").write_text(json.dumps(meta))
    return root / "meta.json"


def stream_tokens_per_s(meta_path: Path, per_worker_batch: int, num_batches: int, seed: int = 0) -> float:
    """Tokens/s delivered by a fresh stream of one worker, window start-ups included."""
    examples = json.loads(meta_path.read_text())["splits"]["train"]["num_examples"]
    stream = PretrainStream(meta_path, unique_examples=examples, seed=seed, per_worker_batch=per_worker_batch)
    start = time.perf_counter()
    tokens = 0
    with closing(stream.batches()) as batches:
        for _, batch in zip(range(num_batches), batches):
            tokens += batch["input_ids"].numel()
    return tokens / (time.perf_counter() - start)


def train_tokens_per_s(config, batches: list[dict], warmup: int = 3) -> float:
    """Tokens/s of the preset student's `scratch` step (forward, backward, clip, AdamW)."""
    torch.set_num_threads(config.train.num_threads)
    student = build_masked_lm(config.student, config.data.vocab_size, config.data.seq_len, seed=0)
    step_module = StudentStep(student, Scratch())
    optimizer = make_optimizer(step_module, config.train.lr)
    tokens, start = 0, None
    for index, raw in enumerate(batches):
        if index == warmup:
            tokens, start = 0, time.perf_counter()
        loss, _ = step_module(prepare_batch(raw), None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(step_module.parameters(), 1.0)
        optimizer.step()
        tokens += raw["input_ids"].numel()
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--examples", type=int, default=4000, help="corpus size (the unique pool)")
    parser.add_argument("--batches", type=int, default=6000, help="stream batches timed per round")
    parser.add_argument("--train-steps", type=int, default=40, help="training steps timed per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best of each is kept")
    args = parser.parse_args()
    config = load_config(args.preset)
    seq_len, batch = config.data.seq_len, config.train.per_worker_batch
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    stream_rates, train_rates = [], []
    with tempfile.TemporaryDirectory() as work:
        meta_path = write_random_corpus(Path(work), args.examples, seq_len, config.data.vocab_size)
        stream_tokens_per_s(meta_path, batch, 10)  # start Ray's workers before timing
        stream = PretrainStream(meta_path, unique_examples=args.examples, seed=1, per_worker_batch=batch)
        with closing(stream.batches()) as batches:
            training_batches = [b for _, b in zip(range(args.train_steps), batches)]
        # Alternating rounds see the same background load (this machine is shared);
        # the best round of each is the least disturbed.
        for round_index in range(args.rounds):
            stream_rates.append(stream_tokens_per_s(meta_path, batch, args.batches, seed=round_index))
            train_rates.append(train_tokens_per_s(config, training_batches))
    ray.shutdown()
    stream_rate, train_rate = max(stream_rates), max(train_rates)
    print(f"preset {args.preset}: batches of {batch} x {seq_len}, student {config.student}, "
          f"{config.train.num_threads} thread(s), load average {os.getloadavg()[0]:.1f}")
    print(f"stream: {stream_rate:,.0f} tokens/s, best of {[round(r) for r in stream_rates]} "
          f"({args.batches} batches each, masking included)")
    print(f"train:  {train_rate:,.0f} tokens/s, best of {[round(r) for r in train_rates]} "
          f"({args.train_steps} steps each of raykd's scratch step)")
    print(json.dumps({"preset": args.preset, "batch": batch, "seq_len": seq_len,
                      "stream_tokens_per_s": round(stream_rate), "train_tokens_per_s": round(train_rate),
                      "ratio": round(stream_rate / train_rate, 2)}))


if __name__ == "__main__":
    main()
