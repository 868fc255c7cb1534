"""Export a checkpoint of this repository to ONNX, checked with onnxruntime.

    python export.py --resume outputs/run/checkpoint.pth --output detr.onnx
    python export.py --resume outputs/run/checkpoint.pth --output detr.onnx --postprocess --check

The model is rebuilt from the flags saved in the checkpoint, in evaluation mode, and captured by
``torch.export`` through ``torch.onnx.export(..., dynamo=True)`` with a dynamic batch size,
height and width. The graph takes a padded batch, each image at the top left (as
``util.misc.pad_images`` makes it):

    images      float32 [B, 3, H, W]   normalized as in training
    mask        bool    [B, H, W]      True on padding
    orig_sizes  int64   [B, 2]         --postprocess only: each image's original (height, width)

and returns the eval-mode model's "pred_logits" [B, Q, K + 1] and "pred_boxes" [B, Q, 4]
(normalized cxcywh, relative to each image's unpadded size), or with ``--postprocess`` the
detections of ``models.postprocess.PostProcess``: "scores" [B, Q], "labels" [B, Q] (int64) and
"boxes" [B, Q, 4] (absolute xyxy in the pixels of ``orig_sizes``). H and W are any sizes: the
graph first pads the batch to multiples of the model's ``size_divisibility`` (32), as the model
pads a list of images, so each image gets what the eager model gives it alone. Training-only
queries (query groups after the first, denoising queries) and the auxiliary outputs are not in
the graph. The flags of the checkpoint's run are stored in the file's metadata (``FLAGS_KEY``,
JSON), where ``predict.py --onnx`` reads its image sizes and class names. ``--check`` runs the
file with onnxruntime on sizes not seen at export, none a multiple of 32, and compares it with
PyTorch (docs/export.md).
"""

import argparse
import contextlib
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from models.detr import DETR
from models.postprocess import PostProcess
from predict import load_model
from util.errors import UserError, cli
from util.misc import pad_images, pad_to_multiple
from util.onnx_session import FLAGS_KEY, onnx_session, run_onnx

logger = logging.getLogger("export")

INPUTS = ("images", "mask")
POSTPROCESS_INPUTS = (*INPUTS, "orig_sizes")
OUTPUTS = ("pred_logits", "pred_boxes")
POSTPROCESS_OUTPUTS = ("scores", "labels", "boxes")
# torch.onnx implements opset 18 and later; its conversion to 17 writes a graph that
# onnxruntime refuses (Split with a num_outputs attribute).
MIN_OPSET = 18
# What --check asserts: max |onnxruntime - torch| <= TOLERANCE * max(1, max |torch|).
TOLERANCE = 1e-4
# The batches --check runs: a padded batch of three sizes, then one image; no size is a
# multiple of 32, and 65 x 97 is odd both ways.
CHECK_BATCHES = ([(101, 133), (72, 88), (64, 70)], [(65, 97)])


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("PVT + DETR export to ONNX", add_help=False)
    add = parser.add_argument
    add("--resume", required=True, help="checkpoint written by main.py")
    add("--output", required=True, help="the ONNX file to write")
    add("--postprocess", action="store_true", help="end the graph with scores, labels, boxes")
    add("--opset", type=int, default=None, help="ONNX opset, 18 or more (default: torch's)")
    add("--check", action="store_true", help="compare the file with PyTorch on new sizes")
    return parser


class ExportedDetector(nn.Module):
    """The exported computation: an eval-mode DETR on a padded batch, padded further to
    multiples of its ``size_divisibility`` (:func:`util.misc.pad_to_multiple`), returning its
    outputs as a tuple (``OUTPUTS``), or with ``postprocess`` its detections
    (``POSTPROCESS_OUTPUTS``)."""

    def __init__(self, model: DETR, postprocess: bool = False):
        super().__init__()
        self.model = model
        self.postprocess = PostProcess(model.class_head) if postprocess else None
        self.eval()

    def forward(
        self, images: Tensor, mask: Tensor, orig_sizes: Tensor | None = None
    ) -> tuple[Tensor, ...]:
        """images [B, 3, H, W], mask [B, H, W] bool, orig_sizes [B, 2] (height, width) with
        postprocess -> (pred_logits, pred_boxes) or (scores, labels, boxes)."""
        images, mask = pad_to_multiple(images, mask, self.model.size_divisibility)
        outputs = self.model(images, mask)
        if self.postprocess is None:
            return tuple(outputs[name] for name in OUTPUTS)
        detections = self.postprocess.batched(outputs, orig_sizes)
        return tuple(detections[name] for name in POSTPROCESS_OUTPUTS)


def padded_batch(
    sizes: list[tuple[int, int]], seed: int = 0, postprocess: bool = False, multiple: int = 0
) -> tuple[Tensor, ...]:
    """Random images of ``sizes`` (height, width) padded to the largest (to multiples of
    ``multiple`` if given): the graph's inputs (``images``, ``mask``, and with ``postprocess``
    ``orig_sizes``, twice each image's size)."""
    g = torch.Generator().manual_seed(seed)
    images, mask = pad_images([torch.randn(3, h, w, generator=g) for h, w in sizes], multiple)
    if not postprocess:
        return images, mask
    return images, mask, 2 * torch.tensor(sizes, dtype=torch.int64)


def dynamic_shapes(postprocess: bool) -> tuple[dict[int, str], ...]:
    """The inputs' dynamic dimensions, any size each: batch, height and width.

    ``torch.onnx.export`` takes a name as ``Dim.DYNAMIC`` and gives it to the file's axis.
    ``Dim.DYNAMIC`` rather than a named ``Dim``, which stops the export where the capture narrows
    its range: it assumes maps of more than one cell at stride 32 (a padded side of at least
    64), which the graph's operators compute the same way at one cell (tests: 17 x 23 and 32 x 32
    images). A dimension declared a multiple of 32 would let the exporter compute sizes from the
    declaration, which the other sizes break."""
    shapes = ({0: "batch", 2: "height", 3: "width"}, {0: "batch", 1: "height", 2: "width"})
    return (*shapes, {0: "batch"}) if postprocess else shapes


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Silence the exporter's notes that say nothing about the result: the constant folder's
    skipped multi-output ops, and the axis names that images and mask share."""
    folding = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = folding.level
    folding.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
            yield
    finally:
        folding.setLevel(level)


def export_onnx(
    model: DETR,
    path: str | Path,
    postprocess: bool = False,
    opset: int | None = None,
    flags: argparse.Namespace | None = None,
) -> None:
    """Write ``model`` (eval mode) to the ONNX file ``path``: inputs ``INPUTS`` (and
    ``orig_sizes`` with ``postprocess``), outputs ``OUTPUTS`` or ``POSTPROCESS_OUTPUTS``; the
    run's ``flags``, if given, as JSON in the metadata under ``FLAGS_KEY``."""
    example = padded_batch([(96, 128), (64, 80)], postprocess=postprocess)
    with quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            ExportedDetector(model, postprocess),
            example,
            dynamo=True,
            verbose=False,
            input_names=POSTPROCESS_INPUTS if postprocess else INPUTS,
            output_names=POSTPROCESS_OUTPUTS if postprocess else OUTPUTS,
            dynamic_shapes=dynamic_shapes(postprocess),
            opset_version=opset,
        )
    if flags is not None:
        program.model.metadata_props[FLAGS_KEY] = json.dumps(vars(flags))
    program.save(path)


def run_torch(model: DETR, inputs: tuple[Tensor, ...], postprocess: bool) -> dict[str, Tensor]:
    """What the graph computes, by eager PyTorch: the outputs of :class:`ExportedDetector`."""
    with torch.no_grad():
        outputs = ExportedDetector(model, postprocess)(*inputs)
    names = POSTPROCESS_OUTPUTS if postprocess else OUTPUTS
    return dict(zip(names, outputs, strict=True))


def differences(onnx: dict[str, Tensor], eager: dict[str, Tensor]) -> dict[str, float]:
    """Per output: max |onnx - eager| over max(1, max |eager|) (labels: the share that differ)."""
    out = {}
    for name, expected in eager.items():
        got = onnx[name]
        if expected.dtype == torch.int64:
            out[name] = (got != expected).float().mean().item()
        else:
            scale = max(1.0, expected.abs().max().item())
            out[name] = (got - expected).abs().max().item() / scale
    return out


def check_onnx(model: DETR, path: str | Path, postprocess: bool = False) -> dict[str, float]:
    """Run ``path`` with onnxruntime on ``CHECK_BATCHES`` (sizes that the export did not see,
    each batch padded to its largest image), compare with ``model``; raise if an output is off
    by more than TOLERANCE of its scale (any label off); return the largest
    :func:`differences`."""
    session = onnx_session(path)
    diffs: dict[str, float] = {}
    for seed, sizes in enumerate(CHECK_BATCHES, start=1):
        inputs = padded_batch(sizes, seed, postprocess)
        found = differences(run_onnx(session, inputs), run_torch(model, inputs, postprocess))
        diffs = {name: max(diffs.get(name, 0.0), d) for name, d in found.items()}
    bad = {name: d for name, d in diffs.items() if d > (0 if name == "labels" else TOLERANCE)}
    if bad:
        raise RuntimeError(
            f"{path}: onnxruntime and PyTorch disagree beyond {TOLERANCE} of the outputs' scale "
            f"({bad}); do not use the file"
        )
    return diffs


def require_export_packages() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise UserError(
            f"export.py needs onnx, onnxscript and onnxruntime ({err.name} is missing); "
            "install them with pip install -e '.[export]'"
        ) from err


def check_args(args: argparse.Namespace) -> None:
    """Refuse what would fail after the export's minutes: the output path, an older opset."""
    folder = Path(args.output).absolute().parent
    if not folder.is_dir():
        raise UserError(f"--output {args.output}: no folder {folder}; create it first")
    if Path(args.output).is_dir():
        raise UserError(f"--output {args.output} is a folder; pass a file name such as model.onnx")
    if args.opset is not None and args.opset < MIN_OPSET:
        raise UserError(
            f"--opset {args.opset}: the exporter writes opset {MIN_OPSET} or later (an older "
            f"file does not load in onnxruntime); pass --opset {MIN_OPSET} or more, or none"
        )


def load_detector(path: str) -> DETR:
    """The eval-mode model of checkpoint ``path``, rebuilt from the flags saved in it."""
    return load_model(path, torch.device("cpu"))[0]


def main(args: argparse.Namespace) -> None:
    require_export_packages()
    check_args(args)
    model, flags = load_model(args.resume, torch.device("cpu"))
    export_onnx(model, args.output, args.postprocess, args.opset, flags)
    logger.info("wrote %s", args.output)
    if args.check:
        diffs = check_onnx(model, args.output, args.postprocess)
        logger.info("onnxruntime agrees with PyTorch: %s", diffs)


if __name__ == "__main__":
    # INFO for this script; the exporter's libraries log every graph rewrite at INFO.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    parser = argparse.ArgumentParser("PVT + DETR export to ONNX", parents=[get_args_parser()])
    cli(lambda: main(parser.parse_args()))
