"""How much a preset's corpus offers a masked LM: count models as yardsticks for the MLM loss.

Prints, in nats per masked token on the validation split (15 % of positions,
seeded), the loss of three count models trained on the train split:
- unigram: ignores context (the study's reference, `unigram_entropy`);
- left neighbour: p(w | previous token), add-k smoothed;
- both neighbours: p(w | left, right) ∝ p(w | left) p(right | w).
A student's MLM validation loss is worth comparing with them: the gap from
the unigram to the neighbour models is structure a model learns from two
tokens of context alone. No training; a minute or two on 2 cores.

    python bench/language_structure.py                 # the local preset's corpus
    python bench/language_structure.py --preset smoke data.seed=1
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from raykd.config import PRESETS, ConfigError, load_config  # noqa: E402

SMOOTHING = 0.01
MAX_VALIDATION_SEQUENCES = 4000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="local", choices=PRESETS)
    parser.add_argument("--cache-dir", help="where the corpus is cached (default: $RAYKD_CACHE or ~/.cache/raykd)")
    parser.add_argument("overrides", nargs="*", metavar="field=value")
    args = parser.parse_args()
    try:
        config = load_config(args.preset, overrides=args.overrides)
    except ConfigError as error:
        print(f"language_structure.py: error: {error}", file=sys.stderr)
        return 2
    import numpy as np
    import pyarrow.parquet as pq

    from raykd.data.meta import load_meta
    from raykd.data.shards import shard_paths
    from raykd.stages import default_cache_dir, prepare_data

    meta = load_meta(prepare_data(config, Path(args.cache_dir) if args.cache_dir else default_cache_dir()))

    def split(name):
        columns = [pq.read_table(path, columns=["input_ids"]).column("input_ids").to_pylist()
                   for path in shard_paths(meta, name)]
        return np.array([row for rows in columns for row in rows], dtype=np.int64)

    train, validation = split("train"), split("validation")[:MAX_VALIDATION_SEQUENCES]
    vocab = meta["vocab_size"]
    specials = sorted(set(meta["special_ids"].values()))
    unigram = np.bincount(train.ravel(), minlength=vocab).astype(float)
    unigram[specials] = 0
    unigram = (unigram + SMOOTHING) / (unigram + SMOOTHING).sum()
    pairs = np.zeros((vocab, vocab))
    np.add.at(pairs, (train[:, :-1].ravel(), train[:, 1:].ravel()), 1)
    following = (pairs + SMOOTHING) / (pairs + SMOOTHING).sum(axis=1, keepdims=True)  # p(next | token)

    rng = np.random.default_rng(0)
    rows, positions = [], []
    inner = np.arange(1, validation.shape[1] - 1)
    for row in range(len(validation)):
        chosen = rng.choice(inner, size=max(1, round(config.data.mask_prob * len(inner))), replace=False)
        rows += [row] * len(chosen)
        positions += chosen.tolist()
    rows, positions = np.array(rows), np.array(positions)
    target = validation[rows, positions]
    left, right = validation[rows, positions - 1], validation[rows, positions + 1]
    keep = ~np.isin(target, specials)
    target, left, right = target[keep], left[keep], right[keep]
    both = following[left] * following[:, right].T
    both /= both.sum(axis=1, keepdims=True)
    figures = {
        "unigram": float(-np.log(unigram[target]).mean()),
        "left_neighbour": float(-np.log(following[left, target]).mean()),
        "both_neighbours": float(-np.log(both[np.arange(len(target)), target]).mean()),
    }
    print(f"{args.preset} corpus: {len(train):,} train sequences of {meta['seq_len']}, vocabulary {vocab}, "
          f"{len(target):,} masked validation tokens")
    for name, value in figures.items():
        print(f"{name:>16}: {value:.3f} nats ({figures['unigram'] - value:.3f} below the unigram)")
    print(json.dumps({"preset": args.preset, **figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
