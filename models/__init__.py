"""The detector and its training pieces, built from typed keywords.

``build_model(args)`` is the only function below the command line that reads the flags; it
passes them on as keywords to :func:`build_detector` and :func:`build_criterion`, which
``hubconf.py``, the benchmarks and the tests call directly.
"""

import argparse

from torch import nn

from models.backbone import build_backbone
from models.criterion import SetCriterion
from models.detr import DETR
from models.matcher import HungarianMatcher
from models.postprocess import PostProcess
from models.transformer import Transformer


def build_detector(
    backbone: str = "pvt_small",
    *,
    num_classes: int = 91,
    num_queries: int = 100,
    hidden_dim: int = 256,
    nheads: int = 8,
    enc_layers: int = 6,
    dec_layers: int = 6,
    dim_feedforward: int = 2048,
    dropout: float = 0.1,
    pre_norm: bool = False,
    position_embedding: str = "sine",
    aux_loss: bool = True,
    feature_stage: int = 4,
    drop_path: float = 0.1,
    train_backbone: bool = True,
    pretrained_backbone: str | None = None,
    size_divisibility: int = 32,
    query_groups: int = 1,
    anchor_queries: bool = False,
    dn_groups: int = 0,
    dn_box_noise: float = 0.4,
    dn_label_noise: float = 0.2,
) -> DETR:
    """DETR on backbone ``backbone`` (a PVT v1 variant or ``resnet50``); the defaults are the
    paper's PVT-Small + DETR. ``num_classes`` is the largest category id + 1 (91 for COCO).
    ``query_groups``, ``anchor_queries`` and ``dn_groups`` (with its noise) are the training
    devices of :class:`models.detr.DETR`, off by default."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 (largest category id + 1), got {num_classes}")
    return DETR(
        build_backbone(
            backbone,
            feature_stage=feature_stage,
            drop_path=drop_path,
            train=train_backbone,
            pretrained=pretrained_backbone,
            position_embedding=position_embedding,
            hidden_dim=hidden_dim,
        ),
        Transformer(
            d_model=hidden_dim,
            nhead=nheads,
            num_encoder_layers=enc_layers,
            num_decoder_layers=dec_layers,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
            pre_norm=pre_norm,
        ),
        num_classes=num_classes,
        num_queries=num_queries,
        aux_loss=aux_loss,
        size_divisibility=size_divisibility,
        query_groups=query_groups,
        anchor_queries=anchor_queries,
        dn_groups=dn_groups,
        dn_box_noise=dn_box_noise,
        dn_label_noise=dn_label_noise,
    )


def build_criterion(
    num_classes: int,
    *,
    set_cost_class: float = 1.0,
    set_cost_bbox: float = 5.0,
    set_cost_giou: float = 2.0,
    bbox_loss_coef: float = 5.0,
    giou_loss_coef: float = 2.0,
    eos_coef: float = 0.1,
) -> SetCriterion:
    """DETR's Hungarian matcher and set loss with the paper's costs and weights by default."""
    matcher = HungarianMatcher(set_cost_class, set_cost_bbox, set_cost_giou)
    weights = {"loss_ce": 1.0, "loss_bbox": bbox_loss_coef, "loss_giou": giou_loss_coef}
    return SetCriterion(num_classes, matcher, weights, eos_coef)


# Flags that reach the builders under their own names.
DETECTOR_FLAGS = (
    "num_classes", "num_queries", "hidden_dim", "nheads", "enc_layers", "dec_layers",
    "dim_feedforward", "dropout", "pre_norm", "position_embedding", "feature_stage", "drop_path",
    "pretrained_backbone", "size_divisibility", "query_groups", "anchor_queries", "dn_groups",
    "dn_box_noise", "dn_label_noise",
)  # fmt: skip
CRITERION_FLAGS = (
    "set_cost_class", "set_cost_bbox", "set_cost_giou", "bbox_loss_coef", "giou_loss_coef",
    "eos_coef",
)  # fmt: skip


def build_model(args: argparse.Namespace) -> tuple[DETR, SetCriterion, dict[str, nn.Module]]:
    """(model, criterion, {"bbox": PostProcess()}) from main.py's flags."""
    model = build_detector(
        args.backbone,
        aux_loss=not args.no_aux_loss,
        train_backbone=args.lr_backbone > 0,
        **{name: getattr(args, name) for name in DETECTOR_FLAGS},
    )
    criterion = build_criterion(
        args.num_classes, **{name: getattr(args, name) for name in CRITERION_FLAGS}
    )
    return model, criterion, {"bbox": PostProcess()}
