"""Checkpoints: tensors and plain data only, written atomically, read with ``weights_only``."""

import argparse
import os
import random
from pathlib import Path

import torch
from torch import Tensor, nn


def save_atomic(obj: dict, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, flush it to disk, then rename.

    A crash or a kill at any moment leaves either the previous file or the new one, never a
    truncated file under ``path``. A write that fails (no space, no permission) raises the
    OSError the file system gave, and leaves the previous file as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            writer = _Writer(f)
            try:
                torch.save(obj, writer)
            except RuntimeError as err:  # torch reports a failed write as a short one
                if writer.error is None:
                    raise
                raise writer.error from err
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class _Writer:
    """A binary file that keeps the OSError of a failed write, which ``torch.save`` replaces with
    a RuntimeError that does not say why."""

    def __init__(self, file):
        self.file = file
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.file.flush()


class _Counter:
    """A sink that counts the bytes written to it."""

    def __init__(self):
        self.size = 0

    def write(self, data) -> int:
        self.size += memoryview(data).nbytes
        return memoryview(data).nbytes

    def flush(self) -> None:
        pass


def saved_size(obj: dict) -> int:
    """The bytes ``torch.save(obj)`` writes (serialized to a counter: nothing is kept)."""
    counter = _Counter()
    torch.save(obj, counter)
    return counter.size


def load(path: str | Path) -> dict:
    """Read a checkpoint on the CPU with ``weights_only=True`` (nothing arbitrary is unpickled).

    ``argparse.Namespace`` is the one class allowed besides tensors and plain data: the official
    DETR training checkpoints store their arguments as one, and it holds nothing executable.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or foreign files
        raise ValueError(
            f"{path} is not a readable checkpoint ({type(err).__name__}: {_reason(err)}); "
            "it may be truncated, or not written by torch.save"
        ) from err
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return checkpoint


def _reason(err: Exception) -> str:
    """The line of ``err``'s message that says what went wrong: torch's ``weights_only``
    refusal spans many lines, and names the object it refused on one of them."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [""]
    return next((line for line in lines if "Unsupported global" in line), lines[0])


def rng_state() -> dict:
    """This process's random-number generator states, as tensors and plain data."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    """``random.setstate`` wants tuples; round-trips may return lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, Tensor], source: str) -> None:
    """``model.load_state_dict`` reporting every missing, unexpected and mis-shaped key at once."""
    check_state_dict(model.state_dict(), state_dict, source)
    model.load_state_dict(state_dict)


def check_state_dict(own: dict[str, Tensor], state_dict: dict[str, Tensor], source: str) -> None:
    """Raise one ValueError listing every key of ``state_dict`` (read from ``source``) that is
    missing from, unexpected in or mis-shaped for a model whose state dict is ``own``."""
    missing = sorted(own.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - own.keys())
    mis_shaped = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or mis_shaped:
        raise ValueError(
            f"{source} does not match the model: missing keys ({len(missing)}): {missing}, "
            f"unexpected keys ({len(unexpected)}): {unexpected}, mis-shaped keys "
            f"({len(mis_shaped)}): {mis_shaped}; check that the model flags (--backbone, "
            "--num_classes, ...) match the file"
        )
