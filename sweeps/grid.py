"""Run the study: teacher stage, the strategy x budget x repetition x seed grid, GLUE evaluation.

    python sweeps/grid.py                                  # the toy study ("local" preset), offline
    python sweeps/grid.py --preset smoke --out runs/smoke  # the < 5 min version the tests run
    python sweeps/grid.py --preset paper --storage s3://BUCKET/raykd   # on a cluster (ray up cluster/aws.yaml)
    python sweeps/grid.py --config my.yaml budgets='[1e12, 2e12]' train.lr=5e-4
    python sweeps/grid.py --out runs/local --resume        # complete an interrupted study

Results: OUT/results.parquet (one row per pretraining trial), OUT/curves.parquet,
OUT/study.json; `python -m analysis.report OUT` turns them into tables and plots.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a plain checkout

from raykd.config import ConfigError, add_study_arguments, check_strategy_pairs, load_arguments  # noqa: E402
from raykd.study_folder import check_binding, check_unlocked, hold  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    add_study_arguments(parser, out_help="output folder (default: runs/<preset>)")
    parser.add_argument("--resume", action="store_true", help="complete the study in OUT; finished trials are kept")
    parser.add_argument("--verbose", action="store_true",
                        help="keep Ray Data's and transformers' progress bars and logs (off by default)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:  # every check that needs no corpus, before torch, transformers and Ray are imported
        config, out = load_arguments(args)
        check_binding(out, config, args.resume)
        check_unlocked(out)
        check_strategy_pairs(config)  # imports torch: after every cheaper check
        with hold(out, "grid.py"):
            from raykd.recipes import run_study, summary_table

            results = run_study(config, out, storage=args.storage, resume=args.resume, cache_dir=args.cache_dir,
                                verbose=args.verbose)
    except (ConfigError, FileNotFoundError) as error:
        print(f"grid.py: error: {error}", file=sys.stderr)
        return 2
    print(f"\n{summary_table(results)}\n")
    print(f"results: {out / 'results.parquet'} ({len(results)} trials)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
