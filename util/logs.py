"""The epoch log of a run: ``log.txt``, one JSON object per line, one line per epoch.

Every reader of a log (resume trimming, the curves, the ablation table) goes through
:func:`read_log`, so a line cut short by a kill is treated the same everywhere: skipped when it is
the last line, an error naming the line anywhere else. ``out.log``, the text log, is written by a
:class:`LogFile`.
"""

import json
import logging
import sys
from pathlib import Path

from util.errors import UserError


def read_log(path: str | Path) -> list[dict]:
    """The records of ``log.txt`` at ``path``; [] when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):  # torn by a kill while it was written
                break
            raise ValueError(
                f"{path}, line {number}: not a JSON log line ({err}); delete or fix that line"
            ) from err
    return records


def append_record(path: str | Path, record: dict) -> None:
    """Add one record as a line of ``log.txt``."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def write_log(path: str | Path, records: list[dict]) -> None:
    """Replace ``log.txt`` with ``records``, atomically (a kill leaves the old or the new file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)


class LogFile(logging.FileHandler):
    """A log file (``out.log``) whose failed write ends the program with a :class:`UserError`
    naming the file and saying ``hint``, rather than a traceback on stderr at every record
    while the program goes on without its log."""

    def __init__(self, path: str | Path, hint: str):
        super().__init__(path)
        self.hint = hint

    def handleError(self, record: logging.LogRecord) -> None:
        err = sys.exc_info()[1]
        if isinstance(err, OSError):
            message = f"cannot write {self.baseFilename}: {err.strerror or err}; {self.hint}"
            raise UserError(message) from err
        super().handleError(record)
