"""Tune the peak pretraining learning rate per (strategy, budget) with Optuna (TPE) and ASHA.

    python sweeps/tune_lr.py --preset smoke            # writes runs/smoke/tuned_lr.json
    python sweeps/grid.py --preset smoke               # then uses those LRs (lr_source: tuned:...)

Search space and effort: the `tune` section of the config (trials, lr_min, lr_max,
budget_fraction, grace_points). The winners are written to OUT/tuned_lr.json,
where grid.py with the same --out reads them.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a plain checkout

from raykd.config import ConfigError, add_study_arguments, check_strategy_pairs, load_arguments  # noqa: E402
from raykd.study_folder import check_unlocked, hold  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_study_arguments(parser, out_help="output folder shared with grid.py (default: runs/<preset>)")
    args = parser.parse_args(argv)
    try:  # every check that needs no corpus, before torch, transformers and Ray are imported
        config, out = load_arguments(args)
        check_unlocked(out)
        check_strategy_pairs(config)  # imports torch: after every cheaper check
        with hold(out, "tune_lr.py"):
            from raykd.plan import TUNED_LR_FILE
            from raykd.recipes import tune_learning_rates

            tuned = tune_learning_rates(config, out, storage=args.storage, cache_dir=args.cache_dir)
    except (ConfigError, FileNotFoundError) as error:
        print(f"tune_lr.py: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(tuned["lr"], indent=1))
    print(f"tuned learning rates: {out / TUNED_LR_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
