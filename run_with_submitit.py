"""Launch main.py on SLURM (or on this machine) through submitit: one task per GPU, requeued on
timeout or preemption, and grids of runs submitted as one job array.

    python run_with_submitit.py --nodes 2 --ngpus 8 --partition learnfair --backbone pvt_small \\
        --dataset_file coco --coco_path /data/coco --output_dir outputs/pvt_small
    python run_with_submitit.py --cluster local --ngpus 1 --device cpu --output_dir outputs/try
    python run_with_submitit.py --sweep num_queries=50,100 no_aux_loss=true,false \\
        --output_dir outputs/queries ...   # then: python -m tools.ablation_table outputs/queries

Every flag of main.py applies; the flags below only describe the job. Run it from the repository
root. docs/cluster.md says more.
"""

import argparse
import itertools
import logging
import os
import signal
import uuid
from pathlib import Path

import submitit

import main as train_main
import options
import training
from util import dist
from util.errors import UserError, cli
from util.preemption import Interrupted

logger = logging.getLogger("run_with_submitit")

JOB_DIR_ENV = "PVT_DETR_JOB_DIR"
SLURM_ONLY = ("partition", "comment", "constraint")


def get_args_parser() -> argparse.ArgumentParser:
    parser = options.RecipeParser(
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
        """Run main.py; a job that finds its own checkpoint (requeued) continues from it.

        On submitit's signal (USR2) main.py saves its position inside the epoch and raises
        :class:`Interrupted`; submitit's own handler, back in place, then has task 0 ask
        :meth:`checkpoint` for the next start and requeue the job. On SIGTERM (scancel, or
        SLURM preempting a job it requeues itself) the tasks save and exit.
        """
        env = submitit.JobEnvironment()
        info = dist.DistInfo(
            rank=env.global_rank, world_size=env.num_tasks, local_rank=env.local_rank
        )
        try:
            train_main.main(self.resumed_args(), info)
        except Interrupted as stop:
            usr_sig = signal.Signals[f"SIG{submitit.JobEnvironment.USR_SIG}"]
            if stop.signum == usr_sig and callable(signal.getsignal(usr_sig)):  # not in debug
                signal.raise_signal(stop.signum)  # task 0 requeues and exits here
            raise

    def resumed_args(self) -> argparse.Namespace:
        """This run's arguments, with ``--resume auto`` once ``--output_dir`` holds a checkpoint.

        The launcher refused to queue a run over an existing checkpoint, so one found later was
        written by this job: by an earlier start that was stopped, preempted or timed out.
        """
        saved = Path(self.args.output_dir) / "checkpoint.pth"
        if self.args.eval or not saved.is_file():
            return self.args
        return argparse.Namespace(**(vars(self.args) | {"resume": "auto"}))

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """The same run, to continue from its newest checkpoint (``--resume auto``).

        Called on timeout or preemption. main.py has saved its position inside the epoch when
        the signal came during training; at other moments (building the data, drawing), the last
        checkpoint is the newest.
        """
        args = self.resumed_args()
        logger.warning(
            "job interrupted (timeout or preemption): requeued; it resumes from %s",
            Path(args.output_dir) / "checkpoint.pth"
            if args.resume == "auto"
            else (args.resume or "scratch, nothing was saved yet"),
        )
        if args.dist_url.startswith("file://"):  # a file store serves one rendezvous only
            args = argparse.Namespace(**(vars(args) | {"dist_url": rendezvous_url(args.job_dir)}))
        return submitit.helpers.DelayedSubmission(type(self)(args))


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
            raise UserError(f"--sweep {item!r}: not NAME=V1,V2; write e.g. num_queries=50,100")
        axes.append([(name.removeprefix("--"), v) for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)]


def parse_value(name: str, value: str) -> object:
    """``value`` converted and checked by main.py's own ``--name`` flag."""
    parser = argparse.ArgumentParser(parents=[options.get_args_parser()], exit_on_error=False)
    defaults = vars(parser.parse_args([]))
    if name not in defaults:
        raise UserError(f"--sweep {name}: not a flag of main.py; see python main.py --help")
    if not isinstance(defaults[name], bool):
        try:
            return getattr(parser.parse_args([f"--{name}", *value.split()]), name)
        except argparse.ArgumentError as err:
            raise UserError(f"--sweep {name}={value}: {err}; pass values that flag takes") from None
    if value not in ("true", "false"):
        raise UserError(f"--sweep {name}={value}: an on/off flag; pass true or false")
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
            raise UserError(f"--{flag} is a SLURM option; drop it for --cluster {args.cluster}")
    if args.cluster == "debug" and args.nodes * args.ngpus != 1:
        raise UserError("--cluster debug runs one process here; pass --nodes 1 --ngpus 1")


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
    for run in runs:  # refuse before queueing what main.py would refuse when the job starts
        training.prepare(run)
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
    cli(main)
