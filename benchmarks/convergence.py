"""Time to AP of the training switches on the built-in data, with a torchvision SSDlite peer.

    .venv/bin/python benchmarks/convergence.py                 # 6 configurations x 2 seeds x 10 min
    .venv/bin/python benchmarks/convergence.py --minutes 0.3 --seeds 0 --configs vanilla anchors \\
        --output_dir outputs/convergence_smoke --pretrained_backbone outputs/smoke/backbone.pth \\
        --pretrain_iters 10                                    # a smoke run of the script

Every DETR configuration trains the demo's model on the demo's data (benchmarks/demo_setup.py,
as ``make demo``: PVT-Tiny pretrained per patch and frozen, DETR on its stage-3 features, lr
1e-4 with 100 warm-up steps, batch 8) for the same wall-clock budget of training, ``--minutes``
(data loading counted, evaluation not), with the LR divided by 10 once 80% of the budget is spent
(the demo divides it after 8 of its 10 epochs). The configurations: vanilla DETR, each switch
alone, all of them (``SWITCHES``), any added with ``--add "NAME FLAGS"``, and "ssdlite":
torchvision's SSDlite320-MobileNetV3 built without pretrained weights, trained on the same
loaders for the same budget and schedule (AdamW at ``--ssd_lr``; images resized to
``--ssd_size``) as a benchmark peer; nothing in ``models/`` uses it. Each run is evaluated
(COCO AP on the 200 validation images) after every epoch and when its budget is spent.

Writes in ``--output_dir``: results.jsonl (one record per evaluation and one per finished run; a
finished run is not repeated, so an interrupted measurement continues where it stopped),
convergence.png (AP and AP50 against minutes and against steps of training, each seed a thin
line, their mean a thick one) and convergence.md (printed too): minutes to AP ``--ap_target`` and
to AP50 ``--ap50_target`` per seed, the mean AP after each of ``--step_marks`` steps, final AP and
AP50 as mean (min-max) over the seeds, seconds per training step and its ratio to vanilla. With
``--steps`` the budget is a number of steps: the AP against steps then does not depend on the
machine's load (the minutes do). ``--plot`` and ``--table`` write those two elsewhere
(``docs/convergence.png``); ``--report`` only writes them, from the records already in
``results.jsonl`` (runs of several processes or machines, concatenated). The demo's backbone
is pretrained first (pretrain_backbone.py, the demo's flags, ``--pretrain_iters`` steps) when
``--pretrained_backbone`` does not exist and a configuration uses it.
"""

import argparse
import logging
import math
import random
import shlex
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from demo_setup import (
    DEMO_BACKBONE,
    DEMO_DATA,
    DEMO_MODEL,
    DEMO_PRETRAIN,
    DEMO_TRAINING,
    SWITCHES,
    shown,
)
from matplotlib import colormaps
from matplotlib.figure import Figure
from torchvision.models.detection import ssdlite320_mobilenet_v3_large
from torchvision.models.detection.transform import GeneralizedRCNNTransform

import options
import pretrain_backbone
from datasets.transforms import IMAGENET_MEAN, IMAGENET_STD
from engine import evaluate, train_one_epoch
from models import build_model
from training import (
    begin_epoch,
    build_datasets,
    build_evaluators,
    build_loaders,
    build_optimizer,
)
from util.boxes import cxcywh_to_xyxy
from util.cpu import configure_malloc
from util.dist import DistInfo
from util.logs import append_record, read_log, write_log

logger = logging.getLogger("convergence")
PEER = "ssdlite"
CPU = torch.device("cpu")


class Clock:
    """A run's training time against its budget: it runs while :meth:`batches` is iterated.
    The budget is ``budget_s`` seconds, or ``budget_steps`` training steps when that is given
    (the seconds are still counted)."""

    def __init__(self, budget_s: float, budget_steps: int = 0):
        self.budget = budget_s
        self.budget_steps = budget_steps
        self.spent = 0.0
        self.steps = 0
        self._since: float | None = None

    def seconds(self) -> float:
        running = 0.0 if self._since is None else time.perf_counter() - self._since
        return self.spent + running

    def fraction(self) -> float:
        """How much of the budget is spent, in [0, 1]."""
        if self.budget_steps:
            return self.steps / self.budget_steps
        return self.seconds() / self.budget

    @property
    def done(self) -> bool:
        return self.fraction() >= 1.0

    def batches(self, loader) -> Iterator:
        """The loader's batches until the budget is spent; loading them and the training steps
        between them count."""
        self._since = time.perf_counter()
        try:
            for batch in loader:
                if self.done:
                    break
                yield batch
                self.steps += 1
        finally:
            self.spent += time.perf_counter() - self._since
            self._since = None


class BudgetSchedule:
    """The LR of a budget: linear warm-up over ``warmup`` steps (as --warmup_iters), then
    divided by 10 once ``drop`` of the clock's budget (time or steps) is spent. ``step()``
    after every optimizer step, as ``engine.train_one_epoch`` steps an LR scheduler."""

    def __init__(self, optimizer, clock: Clock, warmup: int, drop: float = 0.8):
        self.optimizer, self.clock, self.warmup, self.drop = optimizer, clock, warmup, drop
        self.base = [group["lr"] for group in optimizer.param_groups]
        self.iteration = 0
        self._apply()

    def step(self) -> None:
        self.iteration += 1
        self._apply()

    def _apply(self) -> None:
        factor = min(1.0, (self.iteration + 1) / self.warmup) if self.warmup else 1.0
        if self.clock.fraction() >= self.drop:
            factor *= 0.1
        for group, base in zip(self.optimizer.param_groups, self.base, strict=True):
            group["lr"] = base * factor


def demo_args(flags: list[str], seed: int, backbone: str | None) -> argparse.Namespace:
    # The demo's pretrained backbone, unless the configuration's flags say otherwise (a
    # configuration trained from scratch gives --pretrained_backbone "").
    extra = [] if backbone is None else ["--pretrained_backbone", backbone]
    argv = [*DEMO_DATA, *DEMO_MODEL, *DEMO_TRAINING, *extra, *flags, "--seed", str(seed)]
    args = options.parse([*argv, "--device", "cpu"])
    options.check_args(args)
    return args


def detr_run(flags: list[str], seed: int, clock: Clock, opts) -> Iterator[dict]:
    """Train the demo's DETR with ``flags`` until ``clock`` is spent; one record per epoch."""
    args = demo_args(flags, seed, opts.pretrained_backbone)
    torch.manual_seed(seed)
    random.seed(seed)
    train_set, val_set, args = build_datasets(args, DistInfo())
    model, criterion, postprocessors = build_model(args)
    train_loader, val_loader = build_loaders(args, train_set, val_set, DistInfo())
    optimizer = build_optimizer(model, args)
    schedule = BudgetSchedule(optimizer, clock, args.warmup_iters)
    evaluators = build_evaluators(args, val_set)
    epoch = 0
    while not clock.done:
        begin_epoch(train_loader, epoch)
        train = train_one_epoch(
            model, criterion, clock.batches(train_loader), optimizer, schedule, CPU, epoch,
            args.clip_max_norm, progress=opts.progress,
        )  # fmt: skip
        test = evaluate(
            model, criterion, postprocessors["bbox"], val_loader, evaluators(), CPU,
            progress=opts.progress,
        )  # fmt: skip
        yield {"epoch": epoch, "train_loss": train.get("loss", math.nan),
               "AP": test["coco_AP"], "AP50": test["coco_AP50"]}  # fmt: skip
        epoch += 1


def torchvision_batch(batch) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """A padded, normalized batch of ours -> torchvision's detection input: each image unpadded
    in [0, 1], its targets as absolute (x0, y0, x1, y1) boxes and category-id labels."""
    images, _, targets = batch
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    out_images, out_targets = [], []
    for image, target in zip(images, targets, strict=True):
        height, width = target["size"].tolist()
        out_images.append((image[:, :height, :width] * std + mean).clamp(0, 1))
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        boxes = cxcywh_to_xyxy(target["boxes"]) * scale
        out_targets.append({"boxes": boxes, "labels": target["labels"]})
    return out_images, out_targets


@torch.no_grad()
def evaluate_torchvision(model, loader, evaluators: dict) -> dict[str, float]:
    """COCO metrics of a torchvision detector, as ``engine.evaluate`` reports them."""
    model.eval()
    for batch in loader:
        images, _ = torchvision_batch(batch)
        by_image = {}
        for target, result in zip(batch[2], model(images), strict=True):
            height, width = target["size"].tolist()
            orig_h, orig_w = target["orig_size"].tolist()
            scale = torch.tensor([orig_w / width, orig_h / height] * 2)
            by_image[int(target["image_id"])] = result | {"boxes": result["boxes"] * scale}
        for evaluator in evaluators.values():
            evaluator.update(by_image)
    stats = {}
    for prefix, evaluator in evaluators.items():
        evaluator.synchronize()
        stats |= {f"{prefix}_{k}": v for k, v in evaluator.summarize().items()}
    return stats


def ssdlite_run(seed: int, clock: Clock, opts) -> Iterator[dict]:
    """Train torchvision's SSDlite from scratch on the demo's loaders until ``clock`` is spent."""
    args = demo_args([], seed, None)
    torch.manual_seed(seed)
    random.seed(seed)
    train_set, val_set, args = build_datasets(args, DistInfo())
    train_loader, val_loader = build_loaders(args, train_set, val_set, DistInfo())
    model = ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=args.num_classes
    )
    if opts.ssd_size != 320:  # its default boxes are relative to the input: any size works
        size = (opts.ssd_size, opts.ssd_size)
        model.transform = GeneralizedRCNNTransform(
            opts.ssd_size, opts.ssd_size, [0.5] * 3, [0.5] * 3, size_divisible=1, fixed_size=size
        )
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.ssd_lr, weight_decay=1e-4)
    schedule = BudgetSchedule(optimizer, clock, args.warmup_iters)
    evaluators = build_evaluators(args, val_set)
    epoch = 0
    while not clock.done:
        begin_epoch(train_loader, epoch)
        model.train()
        losses = []
        for batch in clock.batches(train_loader):
            loss = sum(model(*torchvision_batch(batch)).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        test = evaluate_torchvision(model, val_loader, evaluators())
        yield {"epoch": epoch, "train_loss": sum(losses) / max(len(losses), 1),
               "AP": test["coco_AP"], "AP50": test["coco_AP50"]}  # fmt: skip
        epoch += 1


def ensure_backbone(opts) -> None:
    if Path(opts.pretrained_backbone).is_file():
        return
    logger.info("pretraining the demo's backbone into %s", opts.pretrained_backbone)
    flags = [*DEMO_PRETRAIN, "--iters", str(opts.pretrain_iters),
             "--num_workers", "1", "--output", opts.pretrained_backbone]  # fmt: skip
    pretrain_backbone.main(pretrain_backbone.get_args_parser().parse_args(flags))


def measure(configs: dict[str, list[str]], opts, results: Path) -> None:
    """Run every (seed, configuration) not yet finished in ``results``, seed by seed."""
    for seed in opts.seeds:
        for name, flags in configs.items():
            records = read_log(results)
            if any(r["config"] == name and r["seed"] == seed and r.get("done") for r in records):
                continue
            write_log(results, [r for r in records if (r["config"], r["seed"]) != (name, seed)])
            budget = f"{opts.steps} steps" if opts.steps else f"{opts.minutes:.1f} minutes"
            logger.info("%s, seed %d: %s of training", name, seed, budget)
            clock = Clock(60 * opts.minutes, opts.steps)
            if name == PEER:
                run = ssdlite_run(seed, clock, opts)
            else:
                run = detr_run(flags, seed, clock, opts)
            for record in run:
                record = {"config": name, "seed": seed, "minutes": clock.seconds() / 60,
                          "steps": clock.steps} | record  # fmt: skip
                logger.info("%s", record)
                append_record(results, record)
            append_record(results, {
                "config": name, "seed": seed, "done": True, "flags": shown(flags),
                "minutes": clock.spent / 60, "steps": clock.steps,
                "seconds_per_step": clock.spent / max(clock.steps, 1),
            })  # fmt: skip


def curves(records: list[dict], name: str) -> dict[int, list[dict]]:
    """{seed: evaluation records in order} of configuration ``name``."""
    out: dict[int, list[dict]] = {}
    for r in records:
        if r["config"] == name and not r.get("done"):
            out.setdefault(r["seed"], []).append(r)
    return out


def plot(records: list[dict], names: list[str], path: Path) -> None:
    """AP and AP50 against minutes (top row) and against training steps (bottom row)."""
    figure = Figure(figsize=(11, 8))
    axes = figure.subplots(2, 2)
    # Matplotlib's 10 default colours, or tab20's 20 for more configurations.
    colors = [f"C{i}" for i in range(10)] if len(names) <= 10 else list(colormaps["tab20"].colors)
    for i, name in enumerate(names):
        by_seed = curves(records, name)
        if not by_seed:
            continue
        color = colors[i % len(colors)]
        for row, x_key in zip(axes, ("minutes", "steps"), strict=True):
            for ax, metric in zip(row, ("AP", "AP50"), strict=True):
                for seed_records in by_seed.values():
                    ax.plot([r[x_key] for r in seed_records], [r[metric] for r in seed_records],
                            color=color, linewidth=0.8, alpha=0.5)  # fmt: skip
                length = min(len(v) for v in by_seed.values())
                mean = [
                    [sum(v[k][key] for v in by_seed.values()) / len(by_seed) for k in range(length)]
                    for key in (x_key, metric)
                ]
                ax.plot(*mean, color=color, linewidth=2.2, marker="o", markersize=3,
                        label=name)  # fmt: skip
    for row, x_label in zip(axes, ("minutes of training", "training steps"), strict=True):
        for ax, metric in zip(row, ("AP", "AP50"), strict=True):
            ax.set_xlabel(x_label)
            ax.set_ylabel(f"COCO {metric} (validation)")
            ax.grid(alpha=0.3)
            ax.set_xlim(left=0)
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)


def _ap_at_steps(runs: list[list[dict]], steps: int) -> str:
    """Mean AP over the seeds at the evaluation after ``steps`` steps ("-" if not reached)."""
    values = [next((r["AP"] for r in run if r["steps"] == steps), None) for run in runs]
    if any(v is None for v in values):
        return "-"
    return f"{sum(values) / len(values):.3f}"


def _first_minutes(seed_records: list[dict], metric: str, target: float) -> str:
    reached = next((r["minutes"] for r in seed_records if r[metric] >= target), None)
    return "-" if reached is None else f"{reached:.1f}"


def _spread(values: list[float]) -> str:
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.3f}"
    return f"{mean:.3f} ({min(values):.3f}-{max(values):.3f})"


def table(records: list[dict], names: list[str], opts) -> str:
    finished = {(r["config"], r["seed"]): r for r in records if r.get("done")}
    per_step = {}
    for name in names:
        steps = [r["seconds_per_step"] for (n, _), r in finished.items() if n == name]
        per_step[name] = sum(steps) / len(steps) if steps else math.nan
    marks = " / ".join(map(str, opts.step_marks))
    lines = [
        f"| configuration | flags | minutes to AP {opts.ap_target} | minutes to AP50 "
        f"{opts.ap50_target} | AP at {marks} steps | final AP | final AP50 | s / step | "
        "vs vanilla |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name in names:
        by_seed = {s: v for s, v in curves(records, name).items() if (name, s) in finished}
        if not by_seed:
            continue
        runs = list(by_seed.values())
        flags = next(r["flags"] for (n, _), r in finished.items() if n == name) or "(none)"
        to_ap = ", ".join(_first_minutes(v, "AP", opts.ap_target) for v in runs)
        to_ap50 = ", ".join(_first_minutes(v, "AP50", opts.ap50_target) for v in runs)
        ratio = per_step[name] / per_step.get("vanilla", math.nan)
        lines.append(
            f"| {name} | `{flags}` | {to_ap} | {to_ap50} | "
            f"{' / '.join(_ap_at_steps(runs, m) for m in opts.step_marks)} | "
            f"{_spread([v[-1]['AP'] for v in runs])}"
            f" | {_spread([v[-1]['AP50'] for v in runs])} | {per_step[name]:.3f} | "
            f"{'' if math.isnan(ratio) else f'{ratio:.2f}x'} |"
        )
    return "\n".join(lines) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--minutes", type=float, default=10.0, help="training budget of every run")
    add("--steps", type=int, default=0,
        help="a budget of training steps instead of minutes (0: --minutes); the AP against "
        "steps does not depend on what else the machine runs")  # fmt: skip
    add("--step_marks", type=int, nargs="+", default=[500, 1000, 2000, 4000],
        help="the table gives the AP after these many steps (evaluations fall every epoch: "
        "500 steps of the demo's batch)")  # fmt: skip
    add("--seeds", type=int, nargs="+", default=[0, 1])
    add("--configs", nargs="+", default=[*SWITCHES, PEER], help=f"of {[*SWITCHES, PEER]}")
    add("--add", action="append", default=[], metavar='"NAME FLAGS"',
        help='another configuration: a name, then its main.py flags, in one word, e.g. '
        '--add "groups3 --query_groups 3"')  # fmt: skip
    add("--output_dir", default="outputs/convergence")
    add("--plot", default="", help="where to draw the figure (default: output_dir)")
    add("--table", default="", help="where to write the table (default: output_dir)")
    add("--pretrained_backbone", default=DEMO_BACKBONE)
    add("--pretrain_iters", type=int, default=1800, help="if the backbone must be pretrained")
    add("--ssd_lr", type=float, default=1e-3, help="AdamW learning rate of the SSDlite peer")
    add("--ssd_size", type=int, default=128,
        help="SSDlite input side (torchvision's model: 320; the issue's peer: 128)")  # fmt: skip
    add("--ap_target", type=float, default=0.25)
    add("--ap50_target", type=float, default=0.5)
    add("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    add("--progress", action="store_true", help="progress bars")
    add("--report", action="store_true",
        help="train nothing: write the table and figure of --configs from output_dir's "
        "results.jsonl (e.g. the records of runs made in parallel, concatenated)")  # fmt: skip
    return parser


def main(opts: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(opts.threads)
    configure_malloc()
    unknown = sorted(set(opts.configs) - {*SWITCHES, PEER})
    if unknown:
        raise SystemExit(f"--configs {unknown}: choose from {[*SWITCHES, PEER]} or use --add")
    configs = {name: SWITCHES.get(name, []) for name in opts.configs}
    for added in opts.add:
        name, *flags = shlex.split(added)
        configs[name] = flags
    out = Path(opts.output_dir)
    results = out / "results.jsonl"
    if not opts.report:
        # The demo's backbone, for the configurations that do not name their own (or none).
        if any(name != PEER and "--pretrained_backbone" not in f for name, f in configs.items()):
            ensure_backbone(opts)
        out.mkdir(parents=True, exist_ok=True)
        measure(configs, opts, results)
    records = read_log(results)
    plot(records, list(configs), Path(opts.plot or out / "convergence.png"))
    text = table(records, list(configs), opts)
    Path(opts.table or out / "convergence.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
