"""Compare training runs: loss terms, class error and COCO AP per epoch, one colour per run.

    python -m tools.plot_curves outputs/run_a outputs/run_b/log.txt --out curves.png
    python -m tools.plot_curves outputs/*/ --names baseline "lr 2e-4" --out curves.png

Each argument is a run's output folder (its ``log.txt`` is read) or a ``log.txt`` itself.
"""

import argparse
import sys
from pathlib import Path

from tools.plot import plot_logs
from util.errors import UserError, cli, user_errors
from util.logs import read_log


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Plot training curves", add_help=False)
    parser.add_argument("runs", nargs="+", help="output folders of main.py runs, or log.txt files")
    parser.add_argument(
        "--names", nargs="+", default=(), help="one label per run (default: folder)"
    )
    parser.add_argument("--out", default="curves.png", help="PNG to write")
    return parser


def log_file(run: str) -> Path:
    """``run`` itself, or the ``log.txt`` in the folder ``run``; checked to be readable."""
    path = Path(run)
    log = path / "log.txt" if path.is_dir() else path
    if not log.is_file():
        raise UserError(f"{log} does not exist; pass a main.py --output_dir or its log.txt")
    with user_errors(ValueError, OSError):
        read_log(log)
    return log


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser("Plot training curves", parents=[get_args_parser()])
    args = parser.parse_args(argv)
    logs = [log_file(run) for run in args.runs]
    if args.names and len(args.names) != len(logs):
        count = f"{len(args.names)} names for {len(logs)} runs"
        raise UserError(f"--names gives {count}; give one name per run")
    out = Path(args.out).absolute()
    if not out.parent.is_dir():
        raise UserError(f"--out {args.out}: no folder {out.parent}; create it first")
    plot_logs(logs, args.out, args.names)
    print(f"curves of {len(logs)} runs written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    cli(main)
