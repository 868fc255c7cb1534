"""The detector and its training pieces, built from typed keywords.

``build_model(args)`` is the only function below the command line that reads the flags; it
passes them on as keywords to :func:`build_detector` and :func:`build_criterion` (every flag
named like one of their keyword-only parameters), which ``hubconf.py``, the benchmarks and the
tests call directly, and builds the training aids the flags switch on (:mod:`models.aids`).
"""

import argparse
import inspect

from torch import nn

from models.aids import build_aids
from models.aids.base import Aid, DetectorSpec
from models.backbone import build_backbone
from models.classification import ClassHead, build_class_head
from models.criterion import SetCriterion
from models.deformable import DeformableTransformer
from models.deformable_detr import DeformableDETR, backbone_levels
from models.detr import DETR
from models.matcher import HungarianMatcher
from models.postprocess import PostProcess
from models.transformer import Transformer

TRANSFORMERS = ("detr", "deformable")


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
    class_head: ClassHead | None = None,
    aids: list[Aid] | tuple[Aid, ...] = (),
    transformer: str = "detr",
    num_feature_levels: int = 4,
    enc_n_points: int = 4,
    dec_n_points: int = 4,
    box_refine: bool = False,
) -> DETR:
    """DETR on backbone ``backbone`` (a PVT v1 variant or ``resnet50``); the defaults are the
    paper's PVT-Small + DETR. ``num_classes`` is the largest category id + 1 (91 for COCO).
    ``class_head``: the classification convention (default DETR's softmax with no-object);
    ``aids``: training aids (:mod:`models.aids`), none by default. ``transformer``
    "deformable": Deformable DETR (:mod:`models.deformable_detr`) over ``num_feature_levels``
    levels with ``enc_n_points`` and ``dec_n_points`` samples per head and level, and with
    ``box_refine`` per-layer box refinement; these four apply to it alone."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 (largest category id + 1), got {num_classes}")
    deformable = transformer == "deformable"
    _check_transformer(
        transformer, pre_norm, num_feature_levels=num_feature_levels, enc_n_points=enc_n_points,
        dec_n_points=dec_n_points, box_refine=box_refine,
    )  # fmt: skip
    joiner = build_backbone(
        backbone,
        feature_stage=feature_stage,
        levels=backbone_levels(num_feature_levels, feature_stage) if deformable else 1,
        drop_path=drop_path,
        train=train_backbone,
        pretrained=pretrained_backbone,
        position_embedding=position_embedding,
        hidden_dim=hidden_dim,
    )
    layers = dict(
        d_model=hidden_dim, nhead=nheads, num_encoder_layers=enc_layers,
        num_decoder_layers=dec_layers, dim_feedforward=dim_feedforward, dropout=dropout,
    )  # fmt: skip
    heads = dict(
        num_classes=num_classes, num_queries=num_queries, aux_loss=aux_loss,
        size_divisibility=size_divisibility, class_head=class_head, aids=aids,
    )  # fmt: skip
    if deformable:
        deformable_transformer = DeformableTransformer(
            **layers, num_feature_levels=num_feature_levels, enc_n_points=enc_n_points,
            dec_n_points=dec_n_points,
        )  # fmt: skip
        return DeformableDETR(joiner, deformable_transformer, **heads, box_refine=box_refine)
    return DETR(joiner, Transformer(**layers, pre_norm=pre_norm), **heads)


def _check_transformer(transformer: str, pre_norm: bool, **deformable_only) -> None:
    """Refuse (ValueError) an unknown transformer and flags it does not read: with DETR's,
    ``deformable_only`` (:func:`build_detector`'s keywords) away from their defaults."""
    if transformer not in TRANSFORMERS:
        raise ValueError(f"unknown transformer {transformer!r}; choose from {list(TRANSFORMERS)}")
    if transformer == "deformable":
        if pre_norm:
            raise ValueError(
                "--pre_norm: the deformable transformer's layers are post-norm (as the official "
                "Deformable DETR's); drop --pre_norm"
            )
        return
    defaults = inspect.signature(build_detector).parameters
    given = [
        f"--{k}" if v is True else f"--{k} {v}"
        for k, v in deformable_only.items()
        if v != defaults[k].default
    ]
    if given:
        raise ValueError(
            f"{', '.join(given)}: the deformable transformer reads these; add --transformer "
            "deformable or drop them"
        )


def build_criterion(
    num_classes: int,
    *,
    set_cost_class: float = 1.0,
    set_cost_bbox: float = 5.0,
    set_cost_giou: float = 2.0,
    cls_loss_coef: float = 1.0,
    bbox_loss_coef: float = 5.0,
    giou_loss_coef: float = 2.0,
    class_head: ClassHead | None = None,
) -> SetCriterion:
    """DETR's Hungarian matcher and set loss with the paper's costs and weights by default;
    ``class_head`` is the classification convention (default DETR's, ``eos_coef`` 0.1)."""
    matcher = HungarianMatcher(set_cost_class, set_cost_bbox, set_cost_giou, class_head)
    weights = {"loss_ce": cls_loss_coef, "loss_bbox": bbox_loss_coef, "loss_giou": giou_loss_coef}
    return SetCriterion(num_classes, matcher, weights, class_head)


def _flags_of(builder, args: argparse.Namespace) -> dict:
    """The flags named like ``builder``'s keyword-only parameters."""
    names = [
        name
        for name, p in inspect.signature(builder).parameters.items()
        if p.kind is p.KEYWORD_ONLY and hasattr(args, name)
    ]
    return {name: getattr(args, name) for name in names}


def build_model(args: argparse.Namespace) -> tuple[DETR, SetCriterion, dict[str, nn.Module]]:
    """(model, criterion, {"bbox": PostProcess}) from main.py's flags."""
    class_head = build_class_head(args.cls_loss, **_flags_of(build_class_head, args))
    spec = DetectorSpec(args.num_classes, args.num_queries, args.hidden_dim, args.dec_layers)
    model = build_detector(
        args.backbone,
        aux_loss=not args.no_aux_loss,
        train_backbone=args.lr_backbone > 0,
        class_head=class_head,
        aids=build_aids(args, spec),
        **_flags_of(build_detector, args),
    )
    criterion = build_criterion(
        args.num_classes, class_head=class_head, **_flags_of(build_criterion, args)
    )
    return model, criterion, {"bbox": PostProcess(class_head)}
