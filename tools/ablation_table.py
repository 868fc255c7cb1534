"""Compare training runs in one Markdown table.

    python -m tools.ablation_table outputs/sweep          # every run folder directly under it
    python -m tools.ablation_table outputs/a outputs/b    # these run folders

A run folder is an ``--output_dir`` of main.py: ``args.json`` and ``log.txt`` (one JSON line per
epoch). Columns: the arguments whose values differ between the runs (the run folder's name when
none do), trainable parameters, the COCO box metrics of the last evaluation (x100; ``-`` where
pycocotools has nothing to measure), the epoch of the best AP, the epochs done, the mean time per
epoch, and ``AP NMS`` (AP after class-wise NMS) when a run was evaluated with ``--eval_nms_iou``.
"""

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path

from util.errors import UserError, cli, user_errors
from util.logs import read_log

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# Arguments that name where a run lives rather than what it trains.
BOOKKEEPING = ("output_dir", "resume", "dist_url")


@dataclass(frozen=True)
class Run:
    name: str
    args: dict
    records: list[dict]

    @property
    def evaluated(self) -> list[dict]:
        return [r for r in self.records if "test_coco_AP" in r]


def find_runs(paths: list[str | Path]) -> list[Path]:
    """The run folders among ``paths``: each path that has ``args.json``, else its subfolders that
    have one, in natural order of their names (``num_queries=5`` before ``num_queries=10``)."""
    runs = []
    for path in map(Path, paths):
        if (path / "args.json").is_file():
            runs.append(path)
            continue
        found = sorted((p.parent for p in path.glob("*/args.json")), key=_natural)
        if not found:
            raise UserError(
                f"{path} has no args.json, nor any subfolder with one; pass output folders of "
                "main.py (or a sweep's --output_dir)"
            )
        runs.extend(found)
    return runs


def _natural(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def load_run(folder: Path) -> Run:
    """A run's resolved arguments and its epoch records (none yet if ``log.txt`` is missing)."""
    try:
        args = json.loads((folder / "args.json").read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{folder / 'args.json'}: not JSON ({err}); rewrite or remove it") from err
    with user_errors(ValueError):
        records = read_log(folder / "log.txt")
    return Run(name=folder.name, args=args, records=records)


def varied_args(runs: list[Run]) -> list[str]:
    """Argument names whose values are not the same in all runs, in the order of ``args.json``."""
    names = list(dict.fromkeys(name for run in runs for name in run.args))
    return [
        name
        for name in names
        if name not in BOOKKEEPING and len({json.dumps(r.args.get(name)) for r in runs}) > 1
    ]


def _setting(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _metric(record: dict, key: str) -> str:
    value = record.get(key)
    return "-" if value is None or value < 0 else f"{100 * value:.1f}"


def _seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"


def row(run: Run, settings: list[str], nms: bool) -> list[str]:
    """The table cells of one run."""
    last = run.evaluated[-1] if run.evaluated else {}
    best = max(run.evaluated, key=lambda r: r["test_coco_AP"]) if run.evaluated else {}
    params = run.records[-1]["n_parameters"] / 1e6 if run.records else None
    times = [r["time"] for r in run.records]
    cells = [_setting(run.args.get(name)) for name in settings] if settings else [run.name]
    cells += ["-" if params is None else f"{params:.2f}M"]
    cells += [_metric(last, f"test_coco_{m}") for m in METRICS]
    cells += [_metric(last, "test_coco_nms_AP")] if nms else []
    cells += [str(best.get("epoch", "-")), str(len(run.records))]
    return cells + [_seconds(sum(times) / len(times)) if times else "-"]


def ablation_table(runs: list[Run]) -> str:
    """The Markdown table of ``runs``, one row each, in the given order."""
    settings = varied_args(runs)
    nms = any("test_coco_nms_AP" in r for run in runs for r in run.records)
    header = [*(settings or ["run"]), "params", *METRICS] + (["AP NMS"] if nms else [])
    header += ["best epoch", "epochs", "time/epoch"]
    lines = [header, ["---"] * len(header)] + [row(run, settings, nms) for run in runs]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        "python -m tools.ablation_table", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("folders", nargs="+", help="run folders, or folders of run folders")
    args = parser.parse_args(argv)
    print(ablation_table([load_run(folder) for folder in find_runs(args.folders)]))


if __name__ == "__main__":
    cli(main)
