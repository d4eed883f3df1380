"""Is the synthetic language learnable and non-trivial? MLM validation loss vs the unigram entropy.

Pretrains two `scratch` students on the local preset's corpus (Ray Train, one
worker): a small one briefly and a bigger one for longer, and prints each one's
MLM validation loss (nats per masked token, fixed masks) next to the unigram
entropy of the masked tokens, the loss of a model that ignores context.
Both must be clearly below the entropy, the bigger one lower still.

    python bench/learnability.py            # a few minutes on 2 cores
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from raykd.config import load_config  # noqa: E402

RUNS = {
    "small": {"student": "{layers: 2, hidden: 64, heads: 2, intermediate: 256}", "budget": 4.0e11},
    "bigger": {"student": "{layers: 2, hidden: 128, heads: 4, intermediate: 512}", "budget": 3.0e12},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply both budgets")
    parser.add_argument("--repetition", type=float, default=2.0, help="data repetition (the pool must fit the corpus)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from raykd.data.shards import unigram_entropy
    from raykd.stages import default_cache_dir, prepare_data
    from raykd.sweep import pretrain_cell

    figures = {}
    for name, run in RUNS.items():
        config = load_config("local", overrides=["strategies=[scratch]", f"student={run['student']}",
                                                 f"budgets=[{run['budget'] * args.scale}]", f"repetitions=[{args.repetition}]",
                                                 "train.eval_points=1", "train.num_threads=2",
                                                 "train.validation_examples=512"])
        summary, _ = pretrain_cell(config, cache_dir=args.cache_dir)
        figures[name] = {"mlm_val_loss": summary["mlm_val_loss"], "budget_flops": run["budget"] * args.scale,
                         "tokens": summary["tokens"], "params_student": run["student"]}
    entropy = unigram_entropy(prepare_data(config, Path(args.cache_dir) if args.cache_dir else default_cache_dir()))
    print(f"unigram entropy of masked tokens: {entropy:.3f} nats")
    for name, figure in figures.items():
        print(f"{name:>7}: student {figure['params_student']}, {figure['tokens']:,} tokens, "
              f"MLM validation loss {figure['mlm_val_loss']:.3f} nats ({entropy - figure['mlm_val_loss']:+.3f} below)")
    learnable = all(f["mlm_val_loss"] < entropy - 0.3 for f in figures.values())
    print(json.dumps({"unigram_entropy": entropy, **{f"{k}_mlm_val_loss": v["mlm_val_loss"] for k, v in figures.items()},
                      "below_entropy": learnable,
                      "bigger_is_lower": figures["bigger"]["mlm_val_loss"] < figures["small"]["mlm_val_loss"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
