"""The epoch log of a run: ``log.txt``, one JSON object per line, one line per epoch.

Every reader of a log (resume trimming, the curves, the ablation table) goes through
:func:`read_log`, so a line cut short by a kill is treated the same everywhere: skipped when it is
the last line, an error naming the line anywhere else.
"""

import json
from pathlib import Path


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
