"""``torch.hub`` entry points: PVT + DETR detectors, the ResNet-50 + DETR baseline, PVT v1.

    model, postprocess = torch.hub.load("path/to/this/repo", "detr_from_checkpoint",
                                        "outputs/pvt_small/checkpoint.pth", source="local")
    model = torch.hub.load("path/to/this/repo", "detr_pvt_small", source="local",
                           weights="detr-r50-e632da11.pth", num_classes=91)

Nothing is downloaded: weights load from a local file. ``detr_from_checkpoint`` takes a checkpoint
of this repository alone and rebuilds its model (architecture, class head, training aids) from the
configuration saved with it. The ``detr_<variant>`` entries build a detector from keywords, the
fields of :class:`models.config.ModelConfig` (``num_classes``, largest category id + 1, 91 for
COCO; ``num_queries``, ``hidden_dim``, ``nheads``, ``enc_layers``, ``dec_layers``,
``dim_feedforward``, ``dropout``, ``pre_norm``, ``position_embedding``, ``aux_loss``,
``transformer``, ...; for PVT detectors also ``feature_stage`` and ``drop_path``), plus
``return_postprocessor``, and load ``weights`` (an official DETR release, a DETR state dict) if
given; without it the model is randomly initialised. Importing this file imports the model code
alone (no data code).
There is one ``detr_<variant>`` and one ``<variant>`` entry per PVT variant of
:data:`models.pvt.VARIANT_DEPTHS`.
"""

from collections.abc import Callable

from models import build_detector, pvt, rebuild_detector
from models.config import ModelConfig
from models.detr import DETR, load_detr_checkpoint
from models.postprocess import PostProcess

dependencies = ["torch", "torchvision", "scipy", "einops"]


def _detr(
    backbone: str, weights: str | None = None, return_postprocessor: bool = False, **kwargs
) -> DETR | tuple[DETR, PostProcess]:
    model = build_detector(ModelConfig(backbone=backbone, **kwargs))
    if weights is not None:
        load_detr_checkpoint(model, weights)
    return (model, PostProcess(model.class_head)) if return_postprocessor else model


def _pvt(variant: str, weights: str | None = None, **kwargs) -> pvt.PyramidVisionTransformer:
    model = pvt.build_pvt(variant, **({"num_classes": 1000} | kwargs))
    if weights is not None:
        pvt.load_pvt_checkpoint(model, weights)
    return model


def detr_from_checkpoint(path: str, device: str = "cpu") -> tuple[DETR, PostProcess]:
    """The evaluation-mode model of a checkpoint of this repository and its post-processing,
    rebuilt from the file alone."""
    model, postprocess, _, _ = rebuild_detector(path)
    return model.to(device).eval(), postprocess


def detr_resnet50(weights: str | None = None, **kwargs):
    """ResNet-50 + DETR, the convolutional baseline; loads official DETR-R50 files unchanged."""
    return _detr("resnet50", weights, **kwargs)


def _entry(build: Callable, variant: str, doc: str) -> Callable:
    def entry(weights: str | None = None, **kwargs):
        return build(variant, weights, **kwargs)

    entry.__doc__ = doc
    return entry


for _variant in pvt.VARIANT_DEPTHS:
    globals()[f"detr_{_variant}"] = _entry(
        _detr, _variant, f"{_variant} + DETR; keywords as in the module docstring."
    )
    globals()[_variant] = _entry(
        _pvt,
        _variant,
        f"PVT v1 {_variant}: the ImageNet classifier by default (``num_classes`` 1000), or a "
        "backbone with ``num_classes=0`` and ``out_indices``; keywords of "
        ":class:`models.pvt.PyramidVisionTransformer`.",
    )
