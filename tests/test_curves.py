"""tools/plot_curves.py and util.plot: several runs' log.txt on shared panels."""

import json
from pathlib import Path

import pytest
from PIL import Image

from tools import plot_curves
from tools.plot import draw_logs


def write_log(folder: Path, epochs: int, scale: float, torn: bool = False) -> Path:
    """A log.txt as main.py writes it; validation (with COCO AP) every other epoch."""
    folder.mkdir(parents=True)
    lines = []
    for epoch in range(epochs):
        record = {"epoch": epoch, "train_loss": scale / (epoch + 1), "train_loss_ce": 1.0}
        record |= {"train_loss_bbox": 0.5, "train_loss_giou": 0.4, "train_class_error": 50.0}
        if epoch % 2:
            record |= {"test_loss": scale, "test_coco_AP": 0.1 * epoch, "test_coco_AP50": 0.2}
        lines.append(json.dumps(record))
    text = "\n".join(lines) + "\n" + ('{"epoch": 9, "train_lo' if torn else "")
    (folder / "log.txt").write_text(text)
    return folder / "log.txt"


def test_two_runs_share_every_panel(tmp_path):
    logs = [write_log(tmp_path / "a", 4, 1.0), write_log(tmp_path / "b", 3, 2.0, torn=True)]
    fig = draw_logs(logs)
    panels = {ax.get_title(): [line.get_label() for line in ax.lines] for ax in fig.axes}
    assert panels["total loss"] == ["a train_loss", "a test_loss", "b train_loss", "b test_loss"]
    assert panels["COCO AP / AP50"][0] == "a test_coco_AP"
    ap = next(line for ax in fig.axes for line in ax.lines if line.get_label() == "a test_coco_AP")
    assert list(ap.get_xdata()) == [1, 3]  # only the epochs that were evaluated
    b_loss = next(
        line for ax in fig.axes for line in ax.lines if line.get_label() == "b train_loss"
    )
    assert list(b_loss.get_xdata()) == [0, 1, 2]  # the torn last line of a killed run is skipped


def test_the_script_takes_run_folders_or_logs_and_writes_a_png(tmp_path):
    write_log(tmp_path / "a", 3, 1.0)
    log_b = write_log(tmp_path / "b", 3, 2.0)
    out = tmp_path / "curves.png"
    plot_curves.main([str(tmp_path / "a"), str(log_b), "--names", "A", "B", "--out", str(out)])
    assert Image.open(out).size[0] > 600


def test_the_script_names_what_is_wrong(tmp_path):
    log = write_log(tmp_path / "a", 2, 1.0)
    with pytest.raises(SystemExit, match="missing"):
        plot_curves.main([str(tmp_path / "missing"), "--out", str(tmp_path / "c.png")])
    with pytest.raises(SystemExit, match="2 names for 1 runs"):
        plot_curves.main([str(log), "--names", "x", "y", "--out", str(tmp_path / "c.png")])
