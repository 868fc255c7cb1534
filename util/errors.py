"""A user's mistake, and the command-line runner that reports it in one line.

A mistake the user can fix (a missing or unreadable file, a bad flag combination, a bad
annotation, a checkpoint that does not fit the model, a dataset that gives no batch) ends a
command with

    error: <what is wrong, naming the file, key or image id>; <what to do>

on stderr, no traceback, and exit status 2 (argparse's status for a bad command line). Anything
else is a bug and keeps its full traceback.
"""

import contextlib
import sys
from collections.abc import Callable, Iterator


class UserError(SystemExit):
    """A mistake the user can fix; the message names the culprit and says what to do.

    A ``SystemExit``, so that where no :func:`cli` catches it (a caller of ``main()`` from
    Python, a submitit job) it still ends the program with its message and no traceback.
    """

    def __init__(self, message: str):
        super().__init__(message)


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


def one_line(message: str) -> str:
    """``message`` with its lines joined by "; "."""
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


def cli(main: Callable[[], object]) -> None:
    """Run ``main()``; a :class:`UserError` prints ``error: <message>`` and exits with status 2."""
    try:
        main()
    except UserError as err:
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        sys.exit(2)
