"""The detector's typed configuration: built once from the flags, saved in checkpoints, and the
only input of :func:`models.build_detector` and :func:`models.build_criterion`.

Field names are the flags' names (``--hidden_dim`` is ``ModelConfig.hidden_dim``), but for
``aux_loss`` (``--no_aux_loss`` off) and ``train_backbone`` (``--lr_backbone`` above 0). An
enabled training aid keeps its own flags under its name in ``aids`` (the aids' flags are
declared in their modules, :mod:`models.aids`). A checkpoint stores :meth:`ModelConfig.to_dict`,
plain data that ``torch.load(weights_only=True)`` reads back; :meth:`ModelConfig.from_dict`
rebuilds it.
"""

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import models.aids


@dataclass(frozen=True)
class LossConfig:
    """The Hungarian matcher's costs and the set loss's weights (DETR's by default)."""

    set_cost_class: float = 1.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    cls_loss_coef: float = 1.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0


@dataclass(frozen=True)
class ModelConfig:
    """A detector: backbone, transformer, heads, class-head convention, loss and training aids.

    The defaults are the PVT paper's PVT-Small + DETR. ``num_classes`` is the largest category
    id + 1 (91 for COCO). ``transformer`` names an entry of ``models.TRANSFORMERS``; the
    deformable transformer alone reads ``num_feature_levels``, ``enc_n_points``,
    ``dec_n_points``, ``box_refine``, ``query_pos_from_boxes`` and ``look_forward_twice``, and
    DETR's alone ``pre_norm``. ``cls_loss`` names a class-head convention
    (:data:`models.classification.CLASS_HEADS`), with ``eos_coef`` (softmax) or ``focal_alpha``
    and ``focal_gamma`` (focal). ``aids``: each enabled aid's name and its flags.
    ``train_backbone`` False freezes the backbone; ``pretrained_backbone`` is a weights file for
    a fresh model (None when the model's weights come from a checkpoint).
    """

    backbone: str = "pvt_small"
    num_classes: int = 91
    num_queries: int = 100
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    pre_norm: bool = False
    position_embedding: str = "sine"
    feature_stage: int = 4
    drop_path: float = 0.1
    transformer: str = "detr"
    num_feature_levels: int = 4
    enc_n_points: int = 4
    dec_n_points: int = 4
    box_refine: bool = False
    query_pos_from_boxes: bool = False
    look_forward_twice: bool = False
    cls_loss: str = "softmax"
    eos_coef: float = 0.1
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    aux_loss: bool = True
    size_divisibility: int = 32
    loss: LossConfig = field(default_factory=LossConfig)
    aids: dict[str, dict[str, Any]] = field(default_factory=dict)
    train_backbone: bool = True
    pretrained_backbone: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ModelConfig":
        """The configuration main.py's flags describe (``num_classes`` resolved)."""
        if args.num_classes is None:
            raise ValueError("num_classes is not resolved: pass --num_classes or read the data")
        values = {name: getattr(args, name) for name in _flag_fields(cls)}
        return cls(
            **values,
            aux_loss=not args.no_aux_loss,
            train_backbone=args.lr_backbone > 0,
            pretrained_backbone=args.pretrained_backbone,
            loss=LossConfig(**{name: getattr(args, name) for name in _flag_fields(LossConfig)}),
            aids={
                aid.name: {flag: getattr(args, flag) for flag in models.aids.aid_flags(aid)}
                for aid in models.aids.AIDS
                if aid.enabled(args)
            },
        )

    @classmethod
    def from_saved_flags(cls, saved: dict[str, Any]) -> "ModelConfig":
        """The configuration of flags saved by a run (a checkpoint's "args"); flags it lacks
        (added since) take their defaults."""
        return cls.from_args(argparse.Namespace(**(flag_defaults() | saved)))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (str, numbers, bools, None, dicts) for a checkpoint."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any], source: str = "the checkpoint") -> "ModelConfig":
        """The configuration :meth:`to_dict` wrote (read from ``source``); a key this version
        does not know raises ValueError naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(saved) - known)
        if unknown:
            raise ValueError(
                f"{source}: model configuration keys {unknown} are unknown to this version; "
                "use the version of the repository that wrote it"
            )
        values = dict(saved)
        if "loss" in values:
            values["loss"] = LossConfig(**values["loss"])
        return cls(**values)


# The fields that are not flags of their own name (ModelConfig.from_args sets them).
_DERIVED = (
    "aux_loss",
    "train_backbone",
    "pretrained_backbone",
    "size_divisibility",
    "loss",
    "aids",
)


def _flag_fields(config: type) -> list[str]:
    return [f.name for f in dataclasses.fields(config) if f.name not in _DERIVED]


def flag_defaults() -> dict[str, Any]:
    """The defaults of the flags :meth:`ModelConfig.from_args` reads (the model's and the
    loss's are :class:`ModelConfig`'s and :class:`LossConfig`'s, the aids' their own)."""
    config = ModelConfig()
    aids = argparse.ArgumentParser(add_help=False)
    for aid in models.aids.AIDS:
        aid.add_args(aids)
    return (
        {name: getattr(config, name) for name in _flag_fields(ModelConfig)}
        | {name: getattr(config.loss, name) for name in _flag_fields(LossConfig)}
        | {"no_aux_loss": False, "lr_backbone": 1e-5, "pretrained_backbone": None}
        | vars(aids.parse_args([]))
    )


def architecture_flags() -> list[str]:
    """The flags a checkpoint's model is rebuilt from: those of :class:`ModelConfig` and
    :class:`LossConfig`, ``--no_aux_loss``, and every aid's."""
    aids = [flag for aid in models.aids.AIDS for flag in models.aids.aid_flags(aid)]
    return [*_flag_fields(ModelConfig), "no_aux_loss", *_flag_fields(LossConfig), *aids]
