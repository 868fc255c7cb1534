"""Launch main.py on SLURM (or on this machine) through submitit: one task per GPU, requeued on
timeout or preemption, and grids of runs submitted as one job array.

    python run_with_submitit.py --nodes 2 --ngpus 8 --partition learnfair --backbone pvt_small \\
        --dataset_file coco --coco_path /data/coco --output_dir outputs/pvt_small
    python run_with_submitit.py --cluster local --ngpus 1 --device cpu --output_dir outputs/try
    python run_with_submitit.py --sweep num_queries=50,100 no_aux_loss=true,false \\
        --output_dir outputs/queries ...   # then: python -m tools.ablation_table outputs/queries

Every flag of main.py applies; the flags below only describe the job. Run it from the repository
root. README, "Running on a cluster", says more.
"""

import argparse
import itertools
import logging
import os
import uuid
from pathlib import Path

import submitit

import main as train_main
import options
from util import dist

logger = logging.getLogger("run_with_submitit")

JOB_DIR_ENV = "PVT_DETR_JOB_DIR"
SLURM_ONLY = ("partition", "comment", "constraint")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "Submitit launcher for PVT + DETR", parents=[options.get_args_parser()]
    )
    group = parser.add_argument_group("cluster")
    add = group.add_argument
    add(
        "--cluster",
        default="slurm",
        choices=("slurm", "local", "debug"),
        help="slurm; local: the same job as subprocesses of this machine; debug: in this process",
    )
    add("--nodes", default=1, type=int)
    add("--ngpus", default=8, type=int, help="GPUs per node, one task each (--device cpu: tasks)")
    add("--timeout", default=2800, type=int, help="minutes per job; it then requeues itself")
    add("--partition", default=None, help="SLURM partition")
    add("--comment", default=None, help="SLURM comment")
    add("--constraint", default=None, help="SLURM constraint, e.g. volta32gb")
    add("--mem_gb", default=None, type=int, help="memory per node (default: the cluster's)")
    add("--cpus_per_task", default=None, type=int, help="default: the cluster's")
    add("--job_name", default="pvt_detr", help="without --output_dir: saves in job_dir/job_name")
    add(
        "--job_dir",
        default=os.environ.get(JOB_DIR_ENV, "outputs/submitit"),
        help=f"submitit logs and rendezvous files, on a file system all nodes share "
        f"(default: ${JOB_DIR_ENV}, else outputs/submitit)",
    )
    add(
        "--sweep",
        nargs="+",
        default=[],
        metavar="NAME=V1,V2",
        help="main.py flags to vary (true,false for on/off flags): one job per combination, "
        "each in output_dir/NAME=V1,...",
    )
    return parser


class Trainer:
    """One run of main.py as a submitit job; submitit calls ``checkpoint`` before requeueing."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def __call__(self) -> None:
        env = submitit.JobEnvironment()
        info = dist.DistInfo(
            rank=env.global_rank, world_size=env.num_tasks, local_rank=env.local_rank
        )
        train_main.main(self.args, info)

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """The same run, to resume from its newest checkpoint (``--resume auto``).

        Called on timeout or preemption: the epoch in progress is lost, the saved ones are not.
        """
        saved = Path(self.args.output_dir) / "checkpoint.pth"
        resume = "auto" if saved.is_file() and not self.args.eval else self.args.resume
        logger.warning(
            "job interrupted (timeout or preemption): requeued; it resumes from %s",
            saved if resume == "auto" else (resume or "scratch, nothing was saved yet"),
        )
        changes = {"resume": resume}
        if self.args.dist_url.startswith("file://"):  # a file store serves one rendezvous only
            changes["dist_url"] = rendezvous_url(self.args.job_dir)
        return submitit.helpers.DelayedSubmission(
            type(self)(argparse.Namespace(**(vars(self.args) | changes)))
        )


def rendezvous_url(job_dir: str) -> str:
    """A new ``file://`` rendezvous in ``job_dir`` (torch's file store must not be reused)."""
    folder = Path(job_dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return (folder / f"rendezvous_{uuid.uuid4().hex}").as_uri()


def sweep_grid(sweep: list[str]) -> list[dict[str, str]]:
    """Every combination of ``NAME=V1,V2`` items, the first item varying slowest."""
    axes = []
    for item in sweep:
        name, _, values = item.partition("=")
        if not name or not values:
            raise SystemExit(f"--sweep {item!r}: write NAME=V1,V2 (e.g. num_queries=50,100)")
        axes.append([(name.removeprefix("--"), v) for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)]


def parse_value(name: str, value: str) -> object:
    """``value`` converted and checked by main.py's own ``--name`` flag."""
    parser = argparse.ArgumentParser(parents=[options.get_args_parser()], exit_on_error=False)
    defaults = vars(parser.parse_args([]))
    if name not in defaults:
        raise SystemExit(f"--sweep: {name} is not a flag of main.py (see python main.py --help)")
    if not isinstance(defaults[name], bool):
        try:
            return getattr(parser.parse_args([f"--{name}", *value.split()]), name)
        except argparse.ArgumentError as err:
            raise SystemExit(f"--sweep {name}={value}: {err}") from None
    if value not in ("true", "false"):
        raise SystemExit(f"--sweep {name}={value}: an on/off flag takes true or false")
    return value == "true"


def plan_runs(args: argparse.Namespace) -> list[argparse.Namespace]:
    """The arguments of each job: one, or one per sweep combination in its own output folder."""
    output_dir = Path(args.output_dir or Path(args.job_dir) / args.job_name)
    runs = []
    for combo in sweep_grid(args.sweep) if args.sweep else [{}]:
        values = {name: parse_value(name, value) for name, value in combo.items()}
        name = ",".join(f"{k}={v}" for k, v in combo.items()).replace(os.sep, "_")
        run = vars(args) | values | {"output_dir": str(output_dir / name)}
        if args.dist_url == "env://":
            run["dist_url"] = rendezvous_url(args.job_dir)
        runs.append(argparse.Namespace(**run))
    return runs


def check_cluster_args(args: argparse.Namespace) -> None:
    if args.cluster == "slurm":
        return
    for flag in SLURM_ONLY:
        if getattr(args, flag) is not None:
            raise SystemExit(f"--{flag} is a SLURM option: drop it for --cluster {args.cluster}")
    if args.cluster == "debug" and args.nodes * args.ngpus != 1:
        raise SystemExit("--cluster debug runs one process here: pass --nodes 1 --ngpus 1")


def build_executor(args: argparse.Namespace) -> submitit.Executor:
    executor = submitit.AutoExecutor(
        folder=Path(args.job_dir) / "%j",
        cluster=args.cluster,
        slurm_max_num_timeout=30,
        local_max_num_timeout=30,
    )
    executor.update_parameters(
        name=args.job_name,
        timeout_min=args.timeout,
        nodes=args.nodes,
        tasks_per_node=args.ngpus,
        gpus_per_node=args.ngpus if args.device == "cuda" else 0,
        cpus_per_task=args.cpus_per_task,
        mem_gb=args.mem_gb,
        slurm_partition=args.partition,
        slurm_comment=args.comment,
        slurm_constraint=args.constraint,
        slurm_signal_delay_s=120,
    )
    return executor


def main(argv: list[str] | None = None) -> list[submitit.Job]:
    """Submit the run (or the sweep's runs as one job array); with --cluster debug, run them."""
    args = get_args_parser().parse_args(argv)
    check_cluster_args(args)
    runs = plan_runs(args)
    for run in runs:  # refuse before queueing, not when the job starts
        options.check_args(options.resolve_resume(run))
    executor = build_executor(args)
    with executor.batch():
        jobs = [executor.submit(Trainer(run)) for run in runs]
    for job, run in zip(jobs, runs, strict=True):
        logger.info("job %s: %s, submitit logs in %s", job.job_id, run.output_dir, job.paths.folder)
    if args.cluster == "debug":
        for job in jobs:
            job.result()
    return jobs


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    main()
