"""Is the synthetic language learnable and non-trivial? MLM validation loss vs the unigram entropy.

Pretrains two `scratch` students on the local preset's corpus (Ray Train, one
worker, the whole training corpus as the pool): the local preset's student for
a few minutes, and a deeper one for longer. Prints each one's MLM validation
loss (nats per masked token, fixed masks) next to the unigram entropy of the
masked tokens, the loss of a model that ignores context. Both must be clearly
(0.3 nats) below the entropy, the bigger one lower still.

    python bench/learnability.py            # about 10 minutes on 2 cores
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from raykd.config import ConfigError, load_config  # noqa: E402

CLEAR_MARGIN = 0.3  # nats below the unigram entropy that count as "clearly learned"
RUNS = {
    "small": {"student": "{layers: 2, hidden: 64, heads: 2, intermediate: 256}", "budget": 3.0e12, "lr": 3.0e-3},
    "bigger": {"student": "{layers: 4, hidden: 64, heads: 2, intermediate: 256}", "budget": 2.0e13, "lr": 3.0e-3},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", help="where the corpus is cached (default: $RAYKD_CACHE or ~/.cache/raykd)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply both budgets")
    args = parser.parse_args()
    if not args.scale > 0:
        print(f"learnability.py: error: --scale must be positive, got {args.scale}", file=sys.stderr)
        return 2
    from raykd.data.meta import load_meta
    from raykd.data.shards import unigram_entropy
    from raykd.stages import default_cache_dir, prepare_data
    from raykd.recipes import pretrain_cell

    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    # The local preset's corpus, with 1000 held-out documents (~790 sequences, ~15k masked
    # tokens) so that the two losses are compared to a few hundredths of a nat.
    data = ["data.validation_documents=1000", "train.validation_examples=1024"]
    meta_path = prepare_data(load_config("local", overrides=data), cache)
    corpus_tokens = load_meta(meta_path)["splits"]["train"]["num_tokens"]
    figures = {}
    for name, run in RUNS.items():
        try:
            config = load_config("local", overrides=[
                "strategies=[scratch]", f"student={run['student']}", f"budgets=[{run['budget'] * args.scale}]",
                f"unique_tokens={corpus_tokens}", f"train.lr={run['lr']}", "train.eval_points=1",
                "train.num_threads=2", *data])
        except ConfigError as error:
            print(f"learnability.py: error: {error}", file=sys.stderr)
            return 2
        summary, _ = pretrain_cell(config, cache_dir=cache)
        figures[name] = {"mlm_val_loss": summary["mlm_val_loss"], "budget_flops": run["budget"] * args.scale,
                         "tokens": summary["tokens"], "epochs": summary["epochs"], "steps": summary["steps"],
                         "device_seconds": summary["device_seconds"], "student": run["student"]}
    entropy = unigram_entropy(meta_path)
    print(f"unigram entropy of masked tokens: {entropy:.3f} nats")
    for name, figure in figures.items():
        print(f"{name:>7}: student {figure['student']}, {figure['steps']} steps, {figure['tokens']:,} tokens "
              f"({figure['epochs']:.1f} passes), {figure['device_seconds']:.0f} s: MLM validation loss "
              f"{figure['mlm_val_loss']:.3f} nats ({entropy - figure['mlm_val_loss']:.3f} below)")
    print(json.dumps({"unigram_entropy": entropy,
                      **{f"{k}_mlm_val_loss": v["mlm_val_loss"] for k, v in figures.items()},
                      **{f"{k}_seconds": v["device_seconds"] for k, v in figures.items()},
                      "below_entropy": all(f["mlm_val_loss"] < entropy - CLEAR_MARGIN for f in figures.values()),
                      "bigger_is_lower": figures["bigger"]["mlm_val_loss"] < figures["small"]["mlm_val_loss"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
