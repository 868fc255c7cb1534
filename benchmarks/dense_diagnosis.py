"""What a convolution-free dense head needs to learn per step on the built-in data.

    .venv/bin/python benchmarks/dense_diagnosis.py --steps 2000       # every configuration
    .venv/bin/python benchmarks/dense_diagnosis.py --steps 20 --step_marks 10 \\
        --output_dir outputs/dense_diagnosis_smoke                     # a smoke run

Every configuration trains, end to end from scratch (no pretraining), a PVT-Tiny whose stages 2,
3 and 4 (strides 8, 16 and 32: 8x8, 4x4 and 2x2 cells at 64 px) feed a dense head under
torchvision's SSD: its default boxes (``DefaultBoxGenerator``, aspect ratios 2 and 3 at every
level, scales 0.2 to 0.95: 6 boxes per cell), its matching (IoU 0.5), its loss (softmax cross
entropy with 3:1 hard negatives, smooth L1 on encoded offsets) and its post-processing (class-wise
NMS at IoU 0.55). The heads differ in the context a cell's prediction sees:

- ``ssd-conv``: torchvision's SSDLite head on the raw levels (3x3 depthwise convolution, BatchNorm,
  then a 1x1 convolution per level): the convolutional measuring stick, not convolution-free.
- ``ssd-mlp``: each level projected to ``--hidden_dim`` (Linear + GroupNorm), then a per-token MLP
  head shared by the levels (class: 2 layers, box: 3 layers): no spatial context.
- ``ssd-encoder``: the projected levels' cells concatenated through ``--context_layers`` DETR
  encoder layers (models.transformer), sine positions plus a learned level embedding, then the
  MLP head: global attention with positions.
- ``ssd-deformable``: ``--context_layers`` deformable encoder layers (models.deformable) over the
  projected levels and one more at stride 64 (a linear map of 2x2 patches), then the MLP head on
  the three strides' cells: local, multi-scale, position-aware context.
- ``dense+decoder``: ``ssd-deformable``, then a deformable DETR decoder whose queries are the dense
  head's ``--topk`` best boxes (their features as content, the boxes, detached, as references,
  refined at every layer), trained with Hungarian matching and DETR's set loss beside the dense
  loss. It is evaluated twice: the dense head with NMS (row ``dense+decoder/dense``) and the
  decoder's boxes as they are, without NMS.

A configuration name may carry the optimisation's settings after a colon, e.g.
``ssd-deformable:backbone_lr=3e-4,warmup=300``: the backbone's AdamW learning rate (default
``--lr``) and the linear warm-up steps (default ``--warmup``). Every run: AdamW (weight decay
1e-4), batch ``--batch_size``, a cosine LR from the warm-up's end to 0 at ``--steps``, the demo's
data and loaders (configs/demo_data.txt: 4000 training images of 64 px, 1 to 3 shapes of 3
kinds; COCO AP on the 200 validation images) after each of ``--step_marks`` and at ``--steps``.

Writes in ``--output_dir``: results.jsonl (one record per evaluation and one per finished run; a
finished run is not repeated) and dense_diagnosis.md (printed too): per configuration the AP and
AP50 at the marks (mean over the seeds) and the seconds per training step (loading included,
evaluation not), with the machine's load average: seconds measured on a loaded machine are not
the model's speed, while the AP after a number of steps does not depend on the load.
"""

import argparse
import logging
import math
import os
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from convergence import evaluate_torchvision, torchvision_batch
from demo_setup import DEMO_DATA
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.ssdlite import SSDLiteHead
from torchvision.ops import box_iou

import options
from datasets.transforms import IMAGENET_MEAN, IMAGENET_STD
from models.backbone import PVTBackbone
from models.criterion import SetCriterion
from models.deformable import DeformableDecoder, DeformableEncoder, valid_ratios
from models.matcher import HungarianMatcher
from models.mlp import MLP
from models.neck import InputLevels
from models.position_encoding import PositionEmbeddingSine, box_sine_encoding
from models.protocol import Memory
from models.pvt import EMBED_DIMS
from models.transformer import TransformerEncoder
from training import begin_epoch, build_datasets, build_evaluators, build_loaders
from util.boxes import cxcywh_to_xyxy, xyxy_to_cxcywh
from util.cpu import configure_malloc
from util.dist import DistInfo
from util.logs import append_record, read_log, write_log

logger = logging.getLogger("dense_diagnosis")

HEADS = ("ssd-conv", "ssd-mlp", "ssd-encoder", "ssd-deformable", "dense+decoder")
STAGES = (2, 3, 4)  # PVT stages at strides 8, 16, 32
SSD_SETTINGS = {  # torchvision's SSDlite post-processing
    "score_thresh": 0.001, "nms_thresh": 0.55, "detections_per_img": 300, "topk_candidates": 300,
}  # fmt: skip


@dataclass(frozen=True)
class Config:
    """A configuration: its head (one of :data:`HEADS`) and its optimisation."""

    name: str
    head: str
    backbone_lr: float
    warmup: int


def parse_config(name: str, opts: argparse.Namespace) -> Config:
    """``HEAD[:backbone_lr=X,warmup=N]`` -> :class:`Config` (defaults: ``--lr``, ``--warmup``)."""
    head, _, settings = name.partition(":")
    if head not in HEADS:
        raise SystemExit(f"--configs {name}: the head {head!r} is not one of {list(HEADS)}")
    values = {"backbone_lr": opts.lr, "warmup": opts.warmup}
    for setting in filter(None, settings.split(",")):
        key, _, value = setting.partition("=")
        if key not in values or not value:
            raise SystemExit(
                f"--configs {name}: {setting!r} is not KEY=VALUE with KEY one of {list(values)}"
            )
        values[key] = type(values[key])(float(value))
    return Config(name, head, **values)


def describe(config: Config, opts: argparse.Namespace) -> str:
    """What a configuration is, in a table cell."""
    layers = opts.context_layers
    text = {
        "ssd-conv": "SSDLite head (3x3 depthwise convolutions): the convolutional measuring stick",
        "ssd-mlp": "per-token MLP head: no spatial context",
        "ssd-encoder": f"{layers} DETR encoder layers over all levels (sine positions), MLP head",
        "ssd-deformable": f"{layers} deformable encoder layers over the levels + stride 64, "
        "MLP head",
        "dense+decoder": f"ssd-deformable + {opts.decoder_layers} deformable decoder layers on "
        f"its top {opts.topk} boxes, set loss",
    }[config.head]
    changes = []
    if config.backbone_lr != opts.lr:
        changes.append(f"backbone lr {config.backbone_lr:g}")
    if config.warmup != opts.warmup:
        changes.append(f"warm-up {config.warmup}")
    return text + "".join(f"; {c}" for c in changes)


class Levels(nn.Module):
    """The PVT-Tiny levels, then a context module: images [B, 3, H, W] (no padding) -> maps
    OrderedDict {"0", "1", "2"} of [B, C_l, H / s_l, W / s_l] at strides 8, 16, 32, as
    torchvision's SSD takes them from its backbone. ``context`` None: the levels as PVT gives
    them (``out_channels`` PVT's); else a module (list of (features, mask)) -> list of [B, d,
    h, w] (``out_channels`` d at every level)."""

    def __init__(self, context: nn.Module | None, hidden_dim: int, drop_path: float):
        super().__init__()
        self.body = PVTBackbone("pvt_tiny", STAGES, drop_path_rate=drop_path)
        self.context = context
        self.out_channels = (
            self.body.out_channels if context is None else (hidden_dim,) * len(STAGES)
        )

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        mask = images.new_zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool)
        levels = self.body(images, mask)
        maps = [x for x, _ in levels] if self.context is None else self.context(levels)
        return OrderedDict((str(i), x) for i, x in enumerate(maps))


class Projected(nn.Module):
    """Each level to ``hidden_dim`` channels (Linear + GroupNorm, as Deformable DETR's input
    projections): no context between cells."""

    def __init__(self, in_channels: tuple[int, ...], hidden_dim: int):
        super().__init__()
        self.inputs = InputLevels(in_channels, hidden_dim, len(in_channels))

    def forward(self, levels: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
        projected = self.inputs([(x, m, None) for x, m in levels], position_encoding=None)
        return [src for src, _, _ in projected]


class GlobalEncoder(nn.Module):
    """The projected levels' cells, concatenated, through DETR encoder layers (post-norm);
    positions: the sine encoding of each level's grid plus a learned level embedding."""

    def __init__(self, in_channels: tuple[int, ...], hidden_dim: int, num_layers: int, ffn: int):
        super().__init__()
        self.inputs = InputLevels(in_channels, hidden_dim, len(in_channels))
        self.position = PositionEmbeddingSine(hidden_dim // 2)
        self.level_embed = nn.Parameter(torch.randn(len(in_channels), hidden_dim))
        self.encoder = TransformerEncoder(
            num_layers, pre_norm=False, d_model=hidden_dim, nhead=8, dim_feedforward=ffn,
            dropout=0.0,
        )  # fmt: skip

    def forward(self, levels: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
        with_pos = [(x, m, self.position(m)) for x, m in levels]
        srcs, masks, pos = zip(*self.inputs(with_pos, self.position), strict=True)
        cells = torch.cat([_cells(s) for s in srcs], 1)
        pos = torch.cat([_cells(p) + e for p, e in zip(pos, self.level_embed, strict=True)], 1)
        memory = self.encoder(cells, pos, torch.cat([m.flatten(1) for m in masks], 1))
        return _maps(memory, [s.shape[-2:] for s in srcs])


class DeformableContext(nn.Module):
    """Deformable encoder layers over the projected levels and one extra level at twice the
    coarsest stride; returns the original levels' cells (the extra level is context only).
    :attr:`last` keeps the last forward's :class:`Memory` for a decoder."""

    def __init__(self, in_channels: tuple[int, ...], hidden_dim: int, num_layers: int, ffn: int):
        super().__init__()
        levels = len(in_channels) + 1
        self.inputs = InputLevels(in_channels, hidden_dim, levels)
        self.position = PositionEmbeddingSine(hidden_dim // 2)
        self.level_embed = nn.Parameter(torch.randn(levels, hidden_dim))
        self.encoder = DeformableEncoder(
            num_layers, d_model=hidden_dim, n_heads=8, dim_feedforward=ffn, dropout=0.0,
            n_levels=levels, n_points=4,
        )  # fmt: skip
        self.last: Memory | None = None

    def forward(self, levels: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
        with_pos = [(x, m, self.position(m)) for x, m in levels]
        srcs, masks, pos = zip(*self.inputs(with_pos, self.position), strict=True)
        cells = torch.cat([_cells(s) for s in srcs], 1)
        pos = torch.cat([_cells(p) + e for p, e in zip(pos, self.level_embed, strict=True)], 1)
        padding = torch.cat([m.flatten(1) for m in masks], 1)
        shapes = torch.tensor([s.shape[-2:] for s in srcs], dtype=torch.long)
        ratios = torch.stack([valid_ratios(m) for m in masks], 1)
        memory = self.encoder(cells, pos, shapes, ratios, padding)
        starts = F.pad(shapes.prod(1).cumsum(0)[:-1], (1, 0))
        self.last = Memory(memory, padding, shapes, starts, ratios)
        return _maps(memory, [s.shape[-2:] for s in srcs])[: len(levels)]


def _cells(x: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, H * W, C], row by row."""
    return x.flatten(2).transpose(1, 2)


def _maps(cells: Tensor, shapes: list[torch.Size]) -> list[Tensor]:
    """[B, S, C] cells of the levels, row by row, finest first -> per level [B, C, H, W]."""
    sizes = [h * w for h, w in shapes]
    return [
        c.transpose(1, 2).unflatten(2, tuple(s))
        for c, s in zip(cells.split(sizes, 1), shapes, strict=True)
    ]


class TokenHead(nn.Module):
    """SSD's head as per-token MLPs shared by the levels: maps [B, d, H, W] per level ->
    {"bbox_regression": [B, N, 4], "cls_logits": [B, N, K]}, N = sum of H * W * anchors, the
    order of torchvision's heads and default boxes (level, row, column, box)."""

    def __init__(self, hidden_dim: int, anchors: int, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.class_mlp = MLP(hidden_dim, hidden_dim, anchors * num_classes, 2)
        self.box_mlp = MLP(hidden_dim, hidden_dim, anchors * 4, 3)

    def forward(self, maps: list[Tensor]) -> dict[str, Tensor]:
        tokens = torch.cat([_cells(x) for x in maps], 1)  # [B, S, d]
        batch = tokens.shape[0]
        return {
            "bbox_regression": self.box_mlp(tokens).reshape(batch, -1, 4),
            "cls_logits": self.class_mlp(tokens).reshape(batch, -1, self.num_classes),
        }


def build_detector(head: str, num_classes: int, opts: argparse.Namespace) -> nn.Module:
    """torchvision's SSD at ``--image_size`` over PVT-Tiny's levels with the dense ``head``;
    for dense+decoder, a :class:`DenseDecoder` over the deformable one."""
    anchor_generator = DefaultBoxGenerator([[2, 3]] * len(STAGES), min_ratio=0.2, max_ratio=0.95)
    anchors = anchor_generator.num_anchors_per_location()
    pvt_channels = tuple(EMBED_DIMS[stage - 1] for stage in STAGES)
    d, layers, ffn = opts.hidden_dim, opts.context_layers, opts.dim_feedforward
    context = {
        "ssd-conv": lambda: None,
        "ssd-mlp": lambda: Projected(pvt_channels, d),
        "ssd-encoder": lambda: GlobalEncoder(pvt_channels, d, layers, ffn),
        "ssd-deformable": lambda: DeformableContext(pvt_channels, d, layers, ffn),
        "dense+decoder": lambda: DeformableContext(pvt_channels, d, layers, ffn),
    }[head]()
    backbone = Levels(context, d, opts.drop_path)
    if context is None:
        norm = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)  # torchvision's SSDlite
        dense_head = SSDLiteHead(list(backbone.out_channels), anchors, num_classes, norm)
    else:
        dense_head = TokenHead(d, anchors[0], num_classes)
    size = (opts.image_size, opts.image_size)
    ssd = SSD(
        backbone, anchor_generator, size, num_classes, image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD), head=dense_head, **SSD_SETTINGS,
    )  # fmt: skip
    if head != "dense+decoder":
        return ssd
    return DenseDecoder(ssd, num_classes, opts.topk, opts.decoder_layers, ffn)


class DenseDecoder(nn.Module):
    """A dense SSD with a deformable context (``ssd``), then a deformable DETR decoder whose
    queries are the dense head's ``topk`` best boxes of each image (query selection, as in
    two-stage Deformable DETR and RT-DETR).

    A query's content is its cell's encoder feature, its position the sine encoding of its box
    through an MLP, its first reference the box; features and boxes are detached, and every layer
    refines the reference. Training returns SSD's two losses and ``set``: DETR's set loss
    (Hungarian matching; softmax with no-object, L1, GIoU) of every decoder layer. Evaluation
    returns per image the last layer's ``topk`` boxes, each with its best class, without NMS; with
    :attr:`dense_only`, the dense head's detections after SSD's NMS.
    """

    def __init__(self, ssd: SSD, num_classes: int, topk: int, num_layers: int, ffn: int):
        super().__init__()
        context = ssd.backbone.context
        if not isinstance(context, DeformableContext):
            raise ValueError("the decoder samples a deformable context's memory")
        d = context.level_embed.shape[1]
        self.ssd, self.topk, self.dense_only = ssd, topk, False
        self.decoder = DeformableDecoder(
            num_layers, d_model=d, n_heads=8, dim_feedforward=ffn, dropout=0.0,
            n_levels=context.level_embed.shape[0], n_points=4,
        )  # fmt: skip
        self.query_pos = MLP(2 * d, d, d, 2)
        self.class_embed = nn.ModuleList(nn.Linear(d, num_classes + 1) for _ in range(num_layers))
        self.bbox_embed = nn.ModuleList(MLP(d, d, 4, 3) for _ in range(num_layers))
        for box in self.bbox_embed:  # the first prediction is the selected box
            nn.init.zeros_(box.layers[-1].weight)
            nn.init.zeros_(box.layers[-1].bias)
        weights = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}
        matcher = HungarianMatcher(cost_class=1.0, cost_bbox=5.0, cost_giou=2.0)
        self.criterion = SetCriterion(num_classes, matcher, weights, losses=("labels", "boxes"))

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """SSD's interface: images in [0, 1], targets with absolute (x0, y0, x1, y1) "boxes" and
        "labels" -> losses (training) or per image "boxes", "scores", "labels" (evaluation)."""
        ssd = self.ssd
        sizes = [tuple(image.shape[-2:]) for image in images]
        batch, targets = ssd.transform(images, targets)
        maps = list(ssd.backbone(batch.tensors).values())
        dense = ssd.head(maps)
        anchors = ssd.anchor_generator(batch, maps)
        if not self.training and self.dense_only:
            detections = ssd.postprocess_detections(dense, anchors, batch.image_sizes)
            return ssd.transform.postprocess(detections, batch.image_sizes, sizes)
        outputs = self.decode(maps, dense, anchors, batch.image_sizes)
        if self.training:
            return self.losses(dense, anchors, outputs, targets, batch.image_sizes)
        detections = []
        for logits, boxes, (h, w) in zip(
            outputs["pred_logits"], outputs["pred_boxes"], batch.image_sizes, strict=True
        ):
            scores, labels = logits.softmax(-1)[:, :-1].max(-1)
            scale = boxes.new_tensor([w, h, w, h])
            detections.append({"boxes": cxcywh_to_xyxy(boxes) * scale, "scores": scores,
                               "labels": labels})  # fmt: skip
        return ssd.transform.postprocess(detections, batch.image_sizes, sizes)

    def decode(self, maps, dense, anchors, image_sizes) -> dict:
        """DETR's outputs ("pred_logits", "pred_boxes", "aux_outputs") of the decoder over the
        dense head's ``topk`` boxes per image."""
        scores = dense["cls_logits"].detach().softmax(-1)[..., 1:].amax(-1)  # [B, N]
        chosen = scores.topk(min(self.topk, scores.shape[1]), dim=1).indices  # [B, k]
        boxes = []
        for regression, image_anchors, index, (h, w) in zip(
            dense["bbox_regression"].detach(), anchors, chosen, image_sizes, strict=True
        ):
            decoded = self.ssd.box_coder.decode_single(regression[index], image_anchors[index])
            scale = decoded.new_tensor([w, h, w, h])
            boxes.append(xyxy_to_cxcywh(decoded / scale).clamp(1e-4, 1.0))
        reference = torch.stack(boxes)  # [B, k, 4]
        tokens = torch.cat([_cells(x) for x in maps], 1)  # [B, S, d], S * anchors = N
        cells = chosen // self.ssd.anchor_generator.num_anchors_per_location()[0]
        content = tokens.gather(1, cells[..., None].expand(-1, -1, tokens.shape[-1])).detach()
        query_pos = self.query_pos(box_sine_encoding(reference, tokens.shape[-1]))
        memory = self.ssd.backbone.context.last
        decoded = self.decoder(content, query_pos, reference, memory, bbox_embed=self.bbox_embed)
        layers = [
            {"pred_logits": embed(hs), "pred_boxes": box}
            for embed, hs, box in zip(self.class_embed, decoded.hs, decoded.boxes, strict=True)
        ]
        return layers[-1] | {"aux_outputs": layers[:-1]}

    def losses(self, dense, anchors, outputs, targets, image_sizes) -> dict[str, Tensor]:
        """SSD's losses of the dense head and the set loss of the decoder's layers."""
        matched = [
            self.ssd.proposal_matcher(box_iou(t["boxes"], a))
            if len(t["boxes"])
            else torch.full((len(a),), -1, dtype=torch.int64, device=a.device)
            for t, a in zip(targets, anchors, strict=True)
        ]
        losses = self.ssd.compute_loss(targets, dense, anchors, matched)
        normalized = [
            {"labels": t["labels"],
             "boxes": xyxy_to_cxcywh(t["boxes"] / t["boxes"].new_tensor([w, h, w, h]))}
            for t, (h, w) in zip(targets, image_sizes, strict=True)
        ]  # fmt: skip
        set_losses = self.criterion(outputs, normalized)
        return losses | {"set": self.criterion.weighted_total(set_losses)}


def build_optimizer(model: nn.Module, config: Config, opts) -> torch.optim.Optimizer:
    """AdamW: PVT's parameters at the configuration's backbone LR, the rest at ``--lr``."""
    pvt = {id(p) for m in model.modules() if isinstance(m, PVTBackbone) for p in m.parameters()}
    backbone = [p for p in model.parameters() if id(p) in pvt]
    rest = [p for p in model.parameters() if id(p) not in pvt]
    groups = [{"params": rest, "lr": opts.lr}, {"params": backbone, "lr": config.backbone_lr}]
    return torch.optim.AdamW(groups, weight_decay=1e-4)


def cosine_schedule(optimizer, warmup: int, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then a cosine from the full LR to 0 at ``steps``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def data(seed: int, opts: argparse.Namespace):
    """(train loader, val loader, evaluator factory, num_classes) of the demo's data."""
    args = options.parse(
        [*DEMO_DATA, "--batch_size", str(opts.batch_size), "--num_workers", str(opts.workers),
         "--seed", str(seed), "--device", "cpu"]
    )  # fmt: skip
    train_set, val_set, args = build_datasets(args, DistInfo())
    train_loader, val_loader = build_loaders(args, train_set, val_set, DistInfo())
    return train_loader, val_loader, build_evaluators(args, val_set), args.num_classes


def evaluate(model: nn.Module, loader, evaluators: Callable[[], dict]) -> dict[str, float]:
    """AP and AP50 of the model's detections, and for dense+decoder dense_AP and dense_AP50:
    those of its dense head (with NMS)."""
    stats = evaluate_torchvision(model, loader, evaluators())
    out = {"AP": stats["coco_AP"], "AP50": stats["coco_AP50"]}
    if isinstance(model, DenseDecoder):
        model.dense_only = True
        stats = evaluate_torchvision(model, loader, evaluators())
        model.dense_only = False
        out |= {"dense_AP": stats["coco_AP"], "dense_AP50": stats["coco_AP50"]}
    return out


def run(config: Config, seed: int, opts: argparse.Namespace, results: Path) -> None:
    """Train ``config`` for ``--steps`` steps, evaluating at the marks; records to ``results``."""
    torch.manual_seed(seed)
    random.seed(seed)
    train_loader, val_loader, evaluators, num_classes = data(seed, opts)
    model = build_detector(config.head, num_classes, opts)
    optimizer = build_optimizer(model, config, opts)
    schedule = cosine_schedule(optimizer, config.warmup, opts.steps)
    marks = sorted({m for m in opts.step_marks if m < opts.steps} | {opts.steps})
    step, seconds, losses, epoch = 0, 0.0, [], 0
    while step < opts.steps:
        begin_epoch(train_loader, epoch)
        model.train()
        start = time.perf_counter()
        for batch in train_loader:
            loss = sum(model(*torchvision_batch(batch)).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if opts.clip_max_norm:
                nn.utils.clip_grad_norm_(model.parameters(), opts.clip_max_norm)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            step += 1
            if step % opts.log_every == 0:
                recent = losses[-opts.log_every :]
                logger.info("%s step %d: loss %.3f", config.name, step, sum(recent) / len(recent))
            if step in marks:
                seconds += time.perf_counter() - start
                record = {"config": config.name, "seed": seed, "steps": step,
                          "seconds": seconds, "train_loss": sum(losses) / len(losses)}  # fmt: skip
                record |= evaluate(model, val_loader, evaluators)
                logger.info("%s", record)
                append_record(results, record)
                losses = []
                model.train()
                start = time.perf_counter()
            if step >= opts.steps:
                break
        seconds += time.perf_counter() - start
        epoch += 1
    append_record(results, {
        "config": config.name, "seed": seed, "done": True, "steps": step,
        "what": describe(config, opts), "seconds_per_step": seconds / step,
        "load_average": os.getloadavg()[0], "threads": torch.get_num_threads(),
    })  # fmt: skip


def measure(configs: list[Config], opts: argparse.Namespace, results: Path) -> None:
    """Run every (seed, configuration) not yet finished in ``results``, one after the other."""
    for seed in opts.seeds:
        for config in configs:
            records = read_log(results)
            key = (config.name, seed)
            if any((r["config"], r["seed"]) == key and r.get("done") for r in records):
                continue
            write_log(results, [r for r in records if (r["config"], r["seed"]) != key])
            logger.info("%s, seed %d: %d steps", config.name, seed, opts.steps)
            run(config, seed, opts, results)


def table(records: list[dict], configs: list[Config], opts: argparse.Namespace) -> str:
    """The Markdown table: AP and AP50 at the marks (mean over the finished seeds), s / step."""
    marks = sorted({m for m in opts.step_marks if m < opts.steps} | {opts.steps})
    header = " / ".join(map(str, marks))
    lines = [
        f"| configuration | what it is | AP at {header} steps | AP50 at {header} steps | "
        "s / step (load average) |",
        "| --- | --- | --- | --- | ---: |",
    ]
    for config in configs:
        done = [r for r in records if r["config"] == config.name and r.get("done")]
        seeds = {r["seed"] for r in done}
        evals = [r for r in records if r["config"] == config.name and r["seed"] in seeds]
        evals = [r for r in evals if not r.get("done")]
        for prefix, label in (("", ""), ("dense_", " (dense head, NMS)")):
            if not any(prefix + "AP" in r for r in evals):
                continue
            cells = []
            for metric in (prefix + "AP", prefix + "AP50"):
                values = []
                for mark in marks:
                    at = [r[metric] for r in evals if r["steps"] == mark]
                    values.append(f"{sum(at) / len(at):.3f}" if len(at) == len(seeds) else "-")
                cells.append(" / ".join(values))
            per_step = sum(r["seconds_per_step"] for r in done) / len(done)
            load = ", ".join(f"{r['load_average']:.1f}" for r in done)
            lines.append(
                f"| {config.name}{label} | {done[0]['what']} | {cells[0]} | {cells[1]} | "
                f"{per_step:.3f} ({load}) |"
            )
    note = (
        f"\n{len(opts.seeds)} seed(s); {opts.steps} steps of batch {opts.batch_size}. Seconds per "
        "step on a machine under the load average given (1-minute, at the end of the run) are "
        "not the models' speed; the AP after a number of steps does not depend on the load.\n"
    )
    return "\n".join(lines) + "\n" + note


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--configs", nargs="+", default=list(HEADS[:4]),
        help=f"HEAD[:backbone_lr=X,warmup=N] with HEAD of {list(HEADS)}")  # fmt: skip
    add("--steps", type=int, default=2000, help="training steps of every run")
    add("--step_marks", type=int, nargs="+", default=[500, 1000, 2000],
        help="evaluate after these many steps (those below --steps) and at --steps")  # fmt: skip
    add("--seeds", type=int, nargs="+", default=[0])
    add("--batch_size", type=int, default=16)
    add("--lr", type=float, default=1e-3, help="AdamW LR (of the backbone too, by default)")
    add("--warmup", type=int, default=0, help="linear LR warm-up steps, by default")
    add("--clip_max_norm", type=float, default=0.0, help="gradient clipping (0: off)")
    add("--image_size", type=int, default=64, help="SSD's fixed input side (the demo's images)")
    add("--hidden_dim", type=int, default=256, help="width of the token heads and contexts")
    add("--context_layers", type=int, default=2, help="encoder layers of the contexts")
    add("--dim_feedforward", type=int, default=1024, help="FFN width of the encoder layers")
    add("--drop_path", type=float, default=0.0, help="PVT's stochastic depth")
    add("--topk", type=int, default=30, help="dense+decoder: boxes selected as queries")
    add("--decoder_layers", type=int, default=3, help="dense+decoder: decoder layers")
    add("--output_dir", default="outputs/dense_diagnosis")
    add("--table", default="", help="where to write the table (default: output_dir)")
    add("--workers", type=int, default=1, help="loader processes")
    add("--log_every", type=int, default=100, help="log the training loss every N steps")
    add("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    return parser


def main(opts: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(opts.threads)
    configure_malloc()
    configs = [parse_config(name, opts) for name in opts.configs]
    out = Path(opts.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    measure(configs, opts, results)
    text = table(read_log(results), configs, opts)
    Path(opts.table or out / "dense_diagnosis.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
