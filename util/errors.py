"""A user's mistake, and the command-line runner that reports it in one line.

A mistake the user can fix (a missing or unreadable file, a bad flag combination, a bad
annotation, a checkpoint that does not fit the model, a dataset that gives no batch, a file that
cannot be written) ends a command with

    error: <what is wrong, naming the file, key or image id>; <what to do>

on stderr, no traceback, and exit status 2 (argparse's status for a bad command line). Anything
else is a bug and keeps its full traceback.

Under ``torch.distributed.run`` the line is printed once: by rank 0 for a mistake every process
sees (flags, files; the others wait for torchrun to end them once rank 0 has exited), by the one
process that met it otherwise (an image only it reads), as ``error: rank R: ...``. A process of
a distributed run ends with ``os._exit``, skipping clean-up that could wait for the others.
torchrun then ends the others and adds its own report: a ``ChildFailedError`` traceback whose
summary names the failed rank and its exit code 2. A process that was waiting for the failed
one in a collective may fail there first and print that error (gloo: "Connection closed by peer
... Check the logs of the remote worker"), or be stopped by torchrun's SIGTERM, or be killed
30 s later (a blocked NCCL collective).
"""

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path


class UserError(SystemExit):
    """A mistake the user can fix; the message names the culprit and says what to do.

    A ``SystemExit``, so that where no :func:`cli` catches it (a caller of ``main()`` from
    Python, a submitit job) it still ends the program with its message and no traceback.

    ``rank``: the process of a distributed run that met the mistake when the others do not see
    it (an image that only it reads); it then reports the mistake itself, naming its rank. None
    (the default): every process sees the same mistake, and rank 0 reports it.
    """

    def __init__(self, message: str, rank: int | None = None):
        super().__init__(message)
        self.rank = rank


@contextlib.contextmanager
def user_errors(*kinds: type[Exception], hint: str = "") -> Iterator[None]:
    """Re-raise the exceptions ``kinds`` raised inside as a :class:`UserError`.

    For library code that raises ValueError or FileNotFoundError on bad input (datasets, weight
    loaders), called where that input comes from the user. ``hint`` (what to do) is appended to
    messages that do not say it themselves.
    """
    try:
        yield
    except kinds as err:
        raise UserError(f"{err}; {hint}" if hint else str(err)) from err


@contextlib.contextmanager
def writing(path: str | Path, hint: str) -> Iterator[None]:
    """Re-raise an OSError raised inside (no space, no permission, a read-only file system) as a
    :class:`UserError` naming ``path``, the file being written, and saying ``hint``."""
    try:
        yield
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}; {hint}") from err


def one_line(message: str) -> str:
    """``message`` with its lines joined by "; "."""
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


# How long a process other than rank 0 waits for rank 0 to report a mistake they both met (and
# for torchrun to end it once rank 0 has exited) before it reports the mistake itself.
REPORT_WAIT_SECONDS = 10.0


def cli(main: Callable[[], object]) -> None:
    """Run ``main()``; a :class:`UserError` prints ``error: <message>`` and exits with status 2.

    In a process of a distributed run (``WORLD_SIZE`` > 1) the line is printed as the module
    says, and the process exits without Python's clean-up, which could wait for the others.
    """
    try:
        main()
    except UserError as err:
        rank, distributed = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)) > 1
        if distributed and err.rank is None and rank != 0:
            time.sleep(REPORT_WAIT_SECONDS)  # torchrun ends this process once rank 0 reported
            err.rank = rank  # still here: rank 0 has not met the mistake
        if err.rank is not None:  # on a line of its own: rank 0's progress bar may be mid-line
            print(f"\nerror: rank {err.rank}: {one_line(str(err))}", file=sys.stderr)
        else:
            print(f"error: {one_line(str(err))}", file=sys.stderr)
        if distributed:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        sys.exit(2)
