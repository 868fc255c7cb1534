"""The detector and its training pieces, built from a typed configuration.

:class:`models.config.ModelConfig` describes a detector; :func:`build_detector` and
:func:`build_criterion` build from it alone, and ``hubconf.py``, the benchmarks and the tests
call them directly. ``build_model(args)`` is the only function below the command line that
reads the flags: it turns them into a configuration once. A checkpoint saves the configuration,
and :func:`rebuild_detector` builds its model from the file alone.

A transformer is one module following :mod:`models.protocol` and one entry of
:data:`TRANSFORMERS`; a training aid is one module and one entry of ``models.aids.AIDS``.
"""

import argparse
import dataclasses
import os

from torch import nn

from models.aids import build_aids
from models.aids.base import DetectorSpec
from models.backbone import build_backbone
from models.classification import ClassHead, build_class_head
from models.config import ModelConfig
from models.criterion import SetCriterion
from models.deformable import DeformableTransformer
from models.detr import DETR, class_bias, load_detr_checkpoint
from models.matcher import HungarianMatcher
from models.postprocess import PostProcess
from models.transformer import Transformer
from util import checkpoint

# ``--transformer``'s choices: each builds its encoder-decoder (``from_config``), says how many
# backbone levels it reads (``backbone_levels``), builds its neck (``build_neck``) and says where
# its sine positions count cells from (``position_offset``).
TRANSFORMERS = {"detr": Transformer, "deformable": DeformableTransformer}


def class_head_of(config: ModelConfig) -> ClassHead:
    """The class-head convention of ``config``."""
    return build_class_head(
        config.cls_loss, eos_coef=config.eos_coef, focal_alpha=config.focal_alpha,
        focal_gamma=config.focal_gamma,
    )  # fmt: skip


def build_detector(config: ModelConfig) -> DETR:
    """The detector ``config`` describes: its training aids, backbone, transformer, neck and
    heads, in that order; the backbone loads ``config.pretrained_backbone`` if given."""
    if config.num_classes < 1:
        raise ValueError(
            f"num_classes must be >= 1 (largest category id + 1), got {config.num_classes}"
        )
    if config.transformer not in TRANSFORMERS:
        raise ValueError(
            f"unknown transformer {config.transformer!r}; choose from {list(TRANSFORMERS)}"
        )
    kind = TRANSFORMERS[config.transformer]
    class_head = class_head_of(config)
    spec = DetectorSpec(
        config.num_classes, config.num_queries, config.hidden_dim, config.dec_layers,
        config.nheads, config.dim_feedforward, config.dropout, kind.takes_references, class_head,
        config.query_pos_from_boxes,
    )  # fmt: skip
    aids = build_aids(config.aids, spec)
    backbone = build_backbone(
        config.backbone,
        feature_stage=config.feature_stage,
        levels=kind.backbone_levels(config),
        drop_path=config.drop_path,
        train=config.train_backbone,
        pretrained=config.pretrained_backbone,
        position_embedding=config.position_embedding,
        hidden_dim=config.hidden_dim,
        position_offset=kind.position_offset,
    )
    transformer = kind.from_config(config, aids)
    neck = transformer.build_neck(backbone.out_channels, backbone.convolution_free)
    return DETR(
        backbone, neck, transformer, config.num_classes, config.num_queries, config.aux_loss,
        config.size_divisibility, class_head, aids,
    )  # fmt: skip


def build_criterion(config: ModelConfig) -> SetCriterion:
    """DETR's Hungarian matcher and set loss with ``config``'s costs, weights and class head."""
    class_head, loss = class_head_of(config), config.loss
    matcher = HungarianMatcher(
        loss.set_cost_class, loss.set_cost_bbox, loss.set_cost_giou, class_head
    )
    weights = {
        "loss_ce": loss.cls_loss_coef, "loss_bbox": loss.bbox_loss_coef,
        "loss_giou": loss.giou_loss_coef,
    }  # fmt: skip
    return SetCriterion(config.num_classes, matcher, weights, class_head)


def build_model(args: argparse.Namespace) -> tuple[DETR, SetCriterion, dict[str, nn.Module]]:
    """(model, criterion, {"bbox": PostProcess}) from main.py's flags."""
    config = ModelConfig.from_args(args)
    model = build_detector(config)
    return model, build_criterion(config), {"bbox": PostProcess(model.class_head)}


def checkpoint_config(state: dict, source: str) -> ModelConfig:
    """The model configuration of checkpoint ``state`` (read from ``source``) of this repository,
    without its ``pretrained_backbone`` (the checkpoint's weights replace it). A checkpoint that
    predates the saved configuration gives it through its flags ("args"); the class count, when
    the flags leave it unresolved, is read from the class head's weights."""
    if "model" not in state or ("config" not in state and "args" not in state):
        missing = "model" if "model" not in state else "config"
        raise ValueError(
            f"{source} has no '{missing}' key; pass a checkpoint written by main.py (its model "
            "is rebuilt from the saved configuration and filled with the 'model' weights)"
        )
    if "config" in state:
        config = ModelConfig.from_dict(state["config"], source)
    else:
        saved = dict(state["args"] if isinstance(state["args"], dict) else vars(state["args"]))
        if saved.get("num_classes") is None:
            head = build_class_head(saved.get("cls_loss", "softmax"))
            saved["num_classes"] = head.num_classes(class_bias(state["model"]).shape[0])
        config = ModelConfig.from_saved_flags(saved)
    return dataclasses.replace(config, pretrained_backbone=None)


def rebuild_detector(path: str | os.PathLike) -> tuple[DETR, PostProcess, ModelConfig, dict]:
    """The model a checkpoint of this repository holds, from the file alone: its configuration
    (:func:`checkpoint_config`), then its weights; with its post-processing, its configuration
    and the checkpoint's contents. Raises FileNotFoundError or ValueError naming the file."""
    state = checkpoint.load(os.fspath(path))
    config = checkpoint_config(state, os.fspath(path))
    model = build_detector(config)
    load_detr_checkpoint(model, state)
    return model, PostProcess(model.class_head), config, state
