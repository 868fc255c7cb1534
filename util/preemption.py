"""Stopping training between two iterations: on SIGTERM and SIGUSR2 (what SLURM, torchrun and
submitit send before they end a job), and saving every few minutes.

The signal handlers only record the signal. The training loop asks :meth:`StopRequests.poll`
after every optimizer step, and every process gets the same answer from one all-reduce, so all
of them save at the same iteration and stop there together.
"""

import signal
import time

import torch

from util import dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class Interrupted(SystemExit):
    """The run saved its position and stops because of signal ``signum``.

    The exit status is 128 + ``signum`` (143 for SIGTERM, 140 for SIGUSR2), what a shell reports
    for a process that signal ended: the run did not finish, and ``--resume`` continues it.
    """

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


class StopRequests:
    """While entered, SIGTERM and SIGUSR2 are recorded instead of ending the process.

    Args:
        save_minutes: ask for a save every this many minutes, by the main process's clock
            (0: never).
        is_main: whether this is the main process (rank 0), whose clock counts.
        device: the device of the process group's collectives (CUDA for nccl).
    """

    def __init__(self, *, save_minutes: float, is_main: bool, device: torch.device):
        self.save_seconds = save_minutes * 60
        self.is_main = is_main
        self.device = device
        self.signum = 0
        self.last_save = time.monotonic()
        self.previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequests":
        for sig in STOP_SIGNALS:
            self.previous[sig] = signal.signal(sig, self._record)
        self.last_save = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _record(self, signum: int, frame) -> None:
        self.signum = max(self.signum, signum)

    def poll(self) -> tuple[int, bool]:
        """(the stop signal received by any process, 0 if none; whether a timed save is due).

        The same on every process: a collective, so every process must call it at the same
        iteration.
        """
        due = (
            self.is_main
            and self.save_seconds > 0
            and time.monotonic() - self.last_save >= self.save_seconds
        )
        flags = [self.signum, int(due)]
        if dist.is_initialized():
            agreed = torch.tensor(flags, dtype=torch.int32, device=self.device)
            torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
            flags = agreed.tolist()
        return flags[0], bool(flags[1])

    def saved(self) -> None:
        """A checkpoint was just written: the next timed save is ``save_minutes`` from now."""
        self.last_save = time.monotonic()
