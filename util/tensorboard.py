"""TensorBoard events of a training run (``main.py --tensorboard``), in ``output_dir/tensorboard``.

Every event's step is the number of training iterations before it: training step ``i`` of epoch
``e`` is step ``e * iterations_per_epoch + i``, and an evaluation after epoch ``e`` has the step
of that epoch's last iteration. A resumed run starts its writer at the step it continues from
(``purge_step``): TensorBoard then drops the events at or after that step that the interrupted
run wrote after its last save, so no step is shown twice.

Needs the ``tensorboard`` package: ``pip install -e '.[tensorboard]'``.
"""

import importlib.util
from pathlib import Path

from torch import Tensor

from util.errors import UserError, writing

INSTALL = "pip install -e '.[tensorboard]'"
# The COCO metrics of an evaluation that are written, for each evaluator (coco_AP, coco_nms_AP..).
AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def check_installed() -> None:
    """Refuse ``--tensorboard`` (:class:`UserError`) where the tensorboard package is missing."""
    if importlib.util.find_spec("tensorboard") is None:
        raise UserError(f"--tensorboard: the tensorboard package is not installed; {INSTALL}")


class TensorBoard:
    """The events of one process (the main one) of a run.

    Args:
        log_dir: the folder of the event files (``output_dir/tensorboard``).
        every: training scalars are written at the steps that are multiples of this.
        purge_step: the step a resumed run continues from (None: a new run).
        hint: what to do when an event file cannot be written.
    """

    def __init__(self, log_dir: Path, *, every: int, purge_step: int | None, hint: str):
        check_installed()
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir, self.every, self.hint = Path(log_dir), every, hint
        with writing(self.log_dir, hint):
            self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def training(self, step: int, scalars: dict[str, float]) -> None:
        """``train/<name>`` for each of a training step's ``scalars`` (loss terms, learning
        rates, images per second), when ``step`` is a multiple of ``every``."""
        if step % self.every:
            return
        with writing(self.log_dir, self.hint):
            for name, value in scalars.items():
                self.writer.add_scalar(f"train/{name}", value, step)

    def evaluation(self, step: int, metrics: dict[str, float]) -> None:
        """``test/<evaluator>_<AP name>`` for the COCO AP metrics of an evaluation (``metrics``
        as ``engine.evaluate`` returns them: ``coco_AP``, ``coco_AP50``, ...) and ``test/loss``."""
        names = [k for k in metrics if k == "loss" or k.rsplit("_", 1)[-1] in AP_NAMES]
        with writing(self.log_dir, self.hint):
            for name in names:
                self.writer.add_scalar(f"test/{name}", metrics[name], step)
            self.writer.flush()

    def images(self, step: int, drawings: dict[str, Tensor]) -> None:
        """``predictions/<name>`` for each uint8 [3, H, W] drawing."""
        with writing(self.log_dir, self.hint):
            for name, image in drawings.items():
                self.writer.add_image(f"predictions/{name}", image, step)
            self.writer.flush()

    def close(self) -> None:
        with writing(self.log_dir, self.hint):
            self.writer.close()
