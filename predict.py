"""Run a trained checkpoint on images: COCO-style detections, drawings and attention maps.

    python predict.py photo.jpg                          # the demo's checkpoint, predictions.json
    python predict.py images/ 'more/*.png' --resume outputs/run/checkpoint.pth --render drawn/
    python predict.py images/ --attention attention/ --device cuda --amp bf16 --batch_size 16
    python predict.py images/ --onnx model.onnx --render drawn/    # a file of export.py

The model is rebuilt from the flags saved in the checkpoint, so none need repeating. With
``--onnx``, onnxruntime runs a file written by export.py on the CPU instead, with the flags of
the checkpoint it was exported from (the file holds them): the same detections, JSON and
drawings, without PyTorch's model (attention figures need it). Inputs are image files, folders
(their image files, not recursive) and globs. Images that cannot be read are reported by name
and skipped.
"""

import argparse
import contextlib
import glob
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from tqdm import tqdm

import datasets
from datasets.coco import read_rgb8
from datasets.shapes import category_names as shape_names
from datasets.transforms import eval_transforms
from models.classification import build_class_head
from models.postprocess import PostProcess
from options import rebuild_model
from tools.attention_maps import DetrAttention, attention_recorder
from tools.deformable_attention import DeformableAttention
from tools.render import write_detections_png
from util.cpu import configure_malloc
from util.errors import UserError, cli, user_errors
from util.misc import pad_images
from util.onnx_session import FLAGS_KEY, onnx_session, run_onnx

logger = logging.getLogger("predict")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
DEMO_CHECKPOINT = "outputs/demo/checkpoint.pth"

# What draws the attention of a model (its transformer's kind).
Recorder = DetrAttention | DeformableAttention


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("PVT + DETR prediction", add_help=False)
    add = parser.add_argument
    add("inputs", nargs="+", help="image files, folders of images, or globs ('photos/*.jpg')")
    add("--resume", help=f"checkpoint written by main.py (default: {DEMO_CHECKPOINT})")
    add("--onnx", help="run this file of export.py with onnxruntime instead of a checkpoint")
    add("--json", default="predictions.json", help="where to write the detections")
    add("--score_threshold", default=0.5, type=float, help="keep detections scored at least this")
    add("--render", default="", help="folder for one PNG per image with the detections drawn")
    add("--render_scale", default=1, type=int, help="enlarge drawings N times (small images)")
    add("--attention", default="", help="folder for decoder and encoder attention figures")
    add("--attention_queries", default=4, type=int, help="how many top-scoring queries to show")
    add(
        "--attention_points",
        nargs="+",
        default=None,
        metavar="X,Y",
        help="encoder self-attention at these points, relative to the image (0..1); "
        "default: the centres of the top-scoring queries' boxes",
    )
    add("--device", help="default: cuda where available, else cpu; --onnx runs on the cpu")
    add("--batch_size", default=4, type=int)
    add("--num_workers", default=2, type=int, help="image decoding processes")
    add("--amp", default="none", choices=("none", "bf16"), help="autocast precision")
    return parser


def list_images(inputs: list[str]) -> list[Path]:
    """The image files named by ``inputs`` (files, folders, globs), in order, without repeats."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found = [path]
        elif any(c in item for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
        else:
            raise UserError(f"{item}: no such file or folder; check the path")
        if not found:
            suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
            raise UserError(f"{item}: no image files there; pass files ending in {suffixes}")
        paths += found
    return list(dict.fromkeys(paths))


def load_model(path: str, device: torch.device) -> tuple[torch.nn.Module, argparse.Namespace]:
    """The evaluation-mode model of checkpoint ``path`` on ``device``, and its training flags."""
    check_checkpoint(path)
    with user_errors(ValueError, hint="pass --resume a checkpoint.pth written by main.py"):
        model, _, args = rebuild_model(path, device)
    return model, args


def checkpoint_path(args: argparse.Namespace) -> str:
    """--resume, or the demo's checkpoint when none is given."""
    return args.resume or DEMO_CHECKPOINT


def device_name(args: argparse.Namespace) -> str:
    """--device, or cuda where available, else cpu (onnxruntime: cpu)."""
    if args.device:
        return args.device
    return "cuda" if torch.cuda.is_available() and not args.onnx else "cpu"


def check_checkpoint(path: str) -> None:
    if not Path(path).is_file():
        raise UserError(
            f"--resume {path}: no such file; pass --resume PATH (a main.py checkpoint), or run "
            f"`make demo`, which writes {DEMO_CHECKPOINT}"
        )


def category_names(args: argparse.Namespace) -> dict[int, str]:
    """Category id -> name: from the annotation files the flags point to when they exist, else
    the built-in shapes set's names, else none (callers print the id)."""
    if args.coco_path is not None or args.dataset_file == "shapes":
        root = datasets.data_root(args)
        for split in ("val", "train"):  # val first: COCO's is 25 MB, train's 450 MB
            ann_file = root / "annotations" / f"instances_{split}2017.json"
            if ann_file.is_file():
                categories = json.loads(ann_file.read_text())["categories"]
                return {c["id"]: c["name"] for c in categories}
    if args.dataset_file == "shapes":
        return shape_names(args.shapes_classes)
    return {}


@dataclass
class Item:
    path: Path
    pixels: Tensor | None = None  # uint8 [3, H, W], the decoded file
    image: Tensor | None = None  # float [3, h, w], the model's input
    error: str = ""


class ImageFiles(Dataset):
    """Decodes each file as the training data does (8-bit RGB) and applies the eval transforms."""

    def __init__(self, paths: list[Path], transform):
        self.paths = paths
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Item:
        path = self.paths[index]
        try:
            pixels = read_rgb8(path)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            return Item(path, error=f"{type(err).__name__}: {err}")
        return Item(path, pixels, self.transform(tv_tensors.Image(pixels)).as_subclass(Tensor))


def detection_records(path: Path, result: dict, names: dict[int, str], threshold: float) -> list:
    """COCO-style result entries ("bbox" absolute [x, y, width, height]) scored >= threshold."""
    records = []
    for score, label, (x0, y0, x1, y1) in zip(
        result["scores"].tolist(), result["labels"].tolist(), result["boxes"].tolist(), strict=True
    ):
        if score >= threshold:
            records.append(
                {
                    "file_name": str(path),
                    "category_id": label,
                    "category_name": names.get(label, str(label)),
                    "score": round(score, 4),
                    "bbox": [round(v, 2) for v in (x0, y0, x1 - x0, y1 - y0)],
                }
            )
    return sorted(records, key=lambda r: -r["score"])


def parse_points(points: list[str] | None) -> Tensor | None:
    """["x,y", ...] relative coordinates -> [n, 2], or None."""
    if points is None:
        return None
    try:
        xy = torch.tensor([[float(v) for v in p.split(",")] for p in points])
    except ValueError as err:
        raise UserError(
            f"--attention_points {' '.join(points)}: not numbers ({err}); pass X,Y pairs such "
            "as 0.5,0.5"
        ) from err
    if xy.dim() != 2 or xy.shape[1] != 2 or not ((xy >= 0) & (xy <= 1)).all():
        raise UserError(f"--attention_points {' '.join(points)}: pass X,Y pairs in [0, 1]")
    return xy


def draw_attention(
    attn: Recorder,
    index: int,
    item: Item,
    result: dict,
    names: dict[int, str],
    out_dir: Path,
    num_queries: int,
    points: Tensor | None,
) -> None:
    """``<stem>_decoder.png``: the cross-attention of the queries of the ``num_queries``
    top-scoring detections; ``<stem>_encoder.png``: the self-attention at ``points`` (default:
    those detections' box centres), for image ``index`` of the batch ``attn`` recorded."""
    height, width = item.pixels.shape[1:]
    top = result["scores"].argsort(descending=True)[:num_queries].cpu()
    boxes = result["boxes"][top].cpu()
    titles = [
        f"{names.get(label, str(label))} {score:.2f}"
        for label, score in zip(
            result["labels"][top].tolist(), result["scores"][top].tolist(), strict=True
        )
    ]
    attn.draw_decoder(
        item.pixels, index, result["queries"][top].cpu(), boxes, titles,
        out_dir / f"{item.path.stem}_decoder.png",
    )  # fmt: skip
    if points is None:
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        points = (centres / torch.tensor([width, height])).clamp(0, 1)
    attn.draw_encoder(item.pixels, index, points, out_dir / f"{item.path.stem}_encoder.png")


def check_output_names(paths: list[Path], args) -> None:
    """Drawings are named after the file stem: two inputs with one stem would overwrite."""
    if not (args.render or args.attention):
        return
    seen: dict[str, Path] = {}
    for path in paths:
        if path.stem in seen:
            raise UserError(
                f"{seen[path.stem]} and {path} would both be drawn as {path.stem}.png; "
                "run them separately, with different --render / --attention folders"
            )
        seen[path.stem] = path


class OnnxDetector:
    """A file written by export.py, run by onnxruntime on the CPU (``--onnx``): called on
    decoded items, it returns what :func:`predict_batch` returns for the checkpoint the file
    was exported from (without "queries"), post-processed by the graph (``--postprocess``) or
    here. ``flags`` are the flags of that checkpoint's run, which export.py stores in the file.
    """

    def __init__(self, path: str):
        try:
            self.session = onnx_session(path)
        except ImportError as err:
            raise UserError(
                f"--onnx needs onnxruntime ({err.name} is missing); install it with "
                "pip install -e '.[export]'"
            ) from err
        except Exception as err:  # onnxruntime's load errors derive from Exception alone
            raise UserError(
                f"--onnx {path}: onnxruntime cannot load it ({str(err).strip()}); pass a file "
                "written by export.py"
            ) from err
        flags = self.session.get_modelmeta().custom_metadata_map.get(FLAGS_KEY)
        if flags is None:
            raise UserError(
                f"--onnx {path}: the file holds no training flags ({FLAGS_KEY}); export the "
                "checkpoint again with export.py, which stores them"
            )
        self.flags = argparse.Namespace(**json.loads(flags))
        self.postprocess = None  # the graph's own (export.py --postprocess), or:
        if "scores" not in [output.name for output in self.session.get_outputs()]:
            self.postprocess = PostProcess(build_class_head(self.flags.cls_loss))

    @torch.inference_mode()
    def __call__(self, items: list[Item]) -> list[dict]:
        """Per item: "scores" [N], "labels" [N] int64, "boxes" [N, 4] absolute xyxy in its
        original image. The batch is padded to its largest image; the graph pads it further to
        the model's ``size_divisibility``, as :func:`predict_batch` does."""
        images, mask = pad_images([item.image for item in items])
        sizes = torch.tensor([item.pixels.shape[1:] for item in items])
        if self.postprocess is not None:
            return self.postprocess(run_onnx(self.session, (images, mask)), sizes)
        out = run_onnx(self.session, (images, mask, sizes))
        return [dict(zip(out, one, strict=True)) for one in zip(*out.values(), strict=True)]


@torch.inference_mode()
def predict_batch(model, items: list[Item], device: torch.device, amp: str) -> list[dict]:
    """PostProcess results for the decoded ``items`` (boxes in each original image), padded as
    the model was trained (``--size_divisibility``)."""
    images, mask = pad_images([item.image for item in items], model.size_divisibility)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
        outputs = model(images.to(device), mask.to(device))
    sizes = torch.tensor([item.pixels.shape[1:] for item in items], device=device)
    return PostProcess(model.class_head)(outputs, sizes)


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad flags, a missing checkpoint and unwritable outputs before any work."""
    for flag in ("batch_size", "render_scale", "attention_queries"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} {getattr(args, flag)}: pass a number >= 1")
    if args.num_workers < 0:
        raise UserError(f"--num_workers {args.num_workers}: pass a number >= 0")
    if args.onnx:
        check_onnx_args(args)
    elif device_name(args).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available here; pass --device cpu")
    else:
        check_checkpoint(checkpoint_path(args))
    json_folder = Path(args.json).absolute().parent
    if not json_folder.is_dir():
        raise UserError(f"--json {args.json}: no folder {json_folder}; create it first")
    if not os.access(json_folder, os.W_OK | os.X_OK):
        raise UserError(f"--json {args.json}: cannot write in {json_folder}; pass another path")
    for flag in ("render", "attention"):
        if getattr(args, flag) and Path(getattr(args, flag)).is_file():
            raise UserError(f"--{flag} {getattr(args, flag)} is a file; pass a folder")


def check_onnx_args(args: argparse.Namespace) -> None:
    """Refuse with ``--onnx`` what needs the checkpoint's PyTorch model, and a missing file."""
    needs_model = {
        "--resume": args.resume,
        "--attention": args.attention,
        f"--device {args.device}": device_name(args) != "cpu",
        f"--amp {args.amp}": args.amp != "none",
    }
    for flag, given in needs_model.items():
        if given:
            raise UserError(
                f"{flag} needs the checkpoint's PyTorch model; --onnx runs the exported file "
                "with onnxruntime on the cpu: drop one of them"
            )
    if not Path(args.onnx).is_file():
        raise UserError(f"--onnx {args.onnx}: no such file; write one with export.py")


def load_detector(
    args: argparse.Namespace,
) -> tuple[Callable[[list[Item]], list[dict]], argparse.Namespace, Recorder | None]:
    """What detects (decoded items -> :func:`predict_batch`'s results), the flags of the run
    it comes from, and the attention recorder (``--attention``), from ``--onnx`` or the
    checkpoint."""
    if args.onnx:
        detector = OnnxDetector(args.onnx)
        return detector, detector.flags, None
    device = torch.device(device_name(args))
    model, train_args = load_model(checkpoint_path(args), device)
    with user_errors(ValueError):
        attn = attention_recorder(model) if args.attention else None
    return partial(predict_batch, model, device=device, amp=args.amp), train_args, attn


def main(args: argparse.Namespace) -> list[Path]:
    """Write the JSON (and drawings); return the inputs that could not be read."""
    check_args(args)
    configure_malloc()
    points = parse_points(args.attention_points)
    paths = list_images(args.inputs)
    check_output_names(paths, args)
    detect, train_args, attn = load_detector(args)
    names = category_names(train_args)
    transform = eval_transforms(size=train_args.eval_size, max_size=train_args.max_size)
    for folder in (args.render, args.attention):
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
    loader = DataLoader(
        ImageFiles(paths, transform),
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        collate_fn=list,
    )
    records, skipped = [], []
    with tqdm(total=len(paths), unit="img", desc="predict") as bar:
        for batch in loader:
            skipped += report_unreadable(batch)
            items = [item for item in batch if not item.error]
            if items:
                records += handle_batch(detect, items, names, args, attn, points)
            bar.update(len(batch))
    Path(args.json).write_text(json.dumps(records, indent=1))
    logger.info("%d detections in %d images written to %s", len(records), len(paths), args.json)
    if skipped:
        logger.warning(
            "skipped %d unreadable images: %s", len(skipped), ", ".join(map(str, skipped))
        )
    return skipped


def report_unreadable(batch: list[Item]) -> list[Path]:
    for item in batch:
        if item.error:
            logger.warning("cannot read %s (%s): skipped", item.path, item.error)
    return [item.path for item in batch if item.error]


def handle_batch(
    detect: Callable[[list[Item]], list[dict]],
    items: list[Item],
    names: dict[int, str],
    args: argparse.Namespace,
    attn: Recorder | None,
    points: Tensor | None,
) -> list[dict]:
    """Predict one batch; write its drawings; return its JSON records."""
    with attn or contextlib.nullcontext():
        results = detect(items)
    records = []
    for index, (item, result) in enumerate(zip(items, results, strict=True)):
        records += detection_records(item.path, result, names, args.score_threshold)
        if args.render:
            png = Path(args.render) / f"{item.path.stem}.png"
            write_detections_png(
                item.pixels, result, names, png, args.score_threshold, args.render_scale
            )
        if attn is not None:
            out_dir = Path(args.attention)
            draw_attention(
                attn, index, item, result, names, out_dir, args.attention_queries, points
            )
    return records


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser("PVT + DETR prediction", parents=[get_args_parser()])
    cli(lambda: main(parser.parse_args()))
