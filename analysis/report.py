"""Write a sweep's report: tables and figures from DIR/results.parquet.

    python -m analysis.report DIR [--out OUT]
    python analysis/report.py DIR [--out OUT]

Writes OUT/report.md and OUT/figures/*.png (OUT defaults to DIR) and prints
their paths. A missing folder or file, or a malformed results file, gives
one error line and exit code 2.
"""
import argparse
import sys
from pathlib import Path

if not __package__:
    # Run as a file (python analysis/report.py): sys.path holds analysis/, not the repo root.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from raykd.analysis import linked_figures, write_report  # noqa: E402
from raykd.config import ConfigError, check_locations  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, write the report, print where it went; return the exit code."""
    parser = argparse.ArgumentParser(prog="python -m analysis.report",
                                     description="Write report.md with the paper's tables and figures.")
    parser.add_argument("sweep_dir", type=Path, help="sweep output folder holding results.parquet")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for report.md and figures/ (default: the sweep folder)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"report: error: {args.sweep_dir}: no such sweep folder", file=sys.stderr)
        return 2
    try:
        check_locations(out=args.out)
    except ConfigError as error:
        print(f"report: error: {error}", file=sys.stderr)
        return 2
    try:
        report = write_report(args.sweep_dir, args.out)
    except (FileNotFoundError, ValueError) as error:
        print(f"report: error: {error}", file=sys.stderr)
        return 2
    print(f"report: {report.resolve()}")
    for figure in linked_figures(report):
        print(f"figure: {figure.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
