import random

import pytest
import torch

from util import checkpoint


class Custom:
    """Any object that is not plain data."""


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    checkpoint.save_atomic({"epoch": 1, "w": torch.ones(3)}, path)

    def crash(obj, f):
        f.write(b"partial bytes of a checkpoint")
        raise KeyboardInterrupt  # a kill in the middle of torch.save

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_atomic({"epoch": 2, "w": torch.zeros(3)}, path)
    state = checkpoint.load(path)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]  # no temporary left


def test_load_rejects_truncated_and_arbitrary_objects(tmp_path):
    path = tmp_path / "c.pth"
    checkpoint.save_atomic({"w": torch.ones(100)}, path)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ValueError, match="c.pth"):
        checkpoint.load(path)

    torch.save({"obj": Custom()}, path)
    with pytest.raises(ValueError, match="c.pth"):  # weights_only refuses to unpickle it
        checkpoint.load(path)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        checkpoint.load(tmp_path / "missing.pth")


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(3)
    random.seed(3)
    checkpoint.save_atomic({"rng": checkpoint.rng_state()}, tmp_path / "r.pth")
    expected = (torch.rand(4), random.random())
    torch.manual_seed(99)
    random.seed(99)
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "r.pth")["rng"])
    assert torch.equal(torch.rand(4), expected[0]) and random.random() == expected[1]
