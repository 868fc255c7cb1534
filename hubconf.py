"""``torch.hub`` entry points: PVT + DETR detectors, the ResNet-50 + DETR baseline, PVT v1.

    model = torch.hub.load("path/to/this/repo", "detr_pvt_small", source="local",
                           weights="outputs/pvt_small/checkpoint.pth")
    model, postprocess = torch.hub.load(..., "detr_pvt_small", return_postprocessor=True)

Nothing is downloaded: weights load from the local file given as ``weights`` (a checkpoint of
this repo, an official DETR or PVT v1 release, or a bare state dict); without it the model is
randomly initialised. Detector keywords: ``num_classes`` (largest category id + 1; 91 for
COCO), ``num_queries``, ``hidden_dim``, ``nheads``, ``enc_layers``, ``dec_layers``,
``dim_feedforward``, ``dropout``, ``pre_norm``, ``position_embedding``, ``aux_loss``,
``return_postprocessor``; PVT detectors also take ``feature_stage`` and ``drop_path``.
"""

from torch import nn

from models import pvt
from models.backbone import Joiner, PVTBackbone, ResNet50Backbone
from models.detr import DETR, PostProcess, load_detr_checkpoint
from models.position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine
from models.transformer import Transformer

dependencies = ["torch", "torchvision", "scipy", "einops"]


def _detr(
    backbone: nn.Module,
    weights: str | None,
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
    return_postprocessor: bool = False,
) -> DETR | tuple[DETR, PostProcess]:
    if position_embedding not in ("sine", "learned"):
        raise ValueError(
            f"position_embedding must be 'sine' or 'learned', got {position_embedding!r}"
        )
    encoding = (
        PositionEmbeddingSine if position_embedding == "sine" else PositionEmbeddingLearned
    )(hidden_dim // 2)
    transformer = Transformer(
        d_model=hidden_dim,
        nhead=nheads,
        num_encoder_layers=enc_layers,
        num_decoder_layers=dec_layers,
        dim_feedforward=dim_feedforward,
        dropout=dropout,
        pre_norm=pre_norm,
    )
    model = DETR(Joiner(backbone, encoding), transformer, num_classes, num_queries, aux_loss)
    if weights is not None:
        load_detr_checkpoint(model, weights)
    return (model, PostProcess()) if return_postprocessor else model


def _detr_pvt(variant: str, weights, feature_stage: int, drop_path: float, kwargs: dict):
    return _detr(PVTBackbone(variant, feature_stage, drop_path), weights, **kwargs)


def detr_pvt_tiny(
    weights: str | None = None, feature_stage: int = 4, drop_path: float = 0.1, **kwargs
):
    """PVT-Tiny + DETR; keywords as in the module docstring."""
    return _detr_pvt("pvt_tiny", weights, feature_stage, drop_path, kwargs)


def detr_pvt_small(
    weights: str | None = None, feature_stage: int = 4, drop_path: float = 0.1, **kwargs
):
    """PVT-Small + DETR (the paper's 34.7 AP model); keywords as in the module docstring."""
    return _detr_pvt("pvt_small", weights, feature_stage, drop_path, kwargs)


def detr_pvt_medium(
    weights: str | None = None, feature_stage: int = 4, drop_path: float = 0.1, **kwargs
):
    """PVT-Medium + DETR; keywords as in the module docstring."""
    return _detr_pvt("pvt_medium", weights, feature_stage, drop_path, kwargs)


def detr_pvt_large(
    weights: str | None = None, feature_stage: int = 4, drop_path: float = 0.1, **kwargs
):
    """PVT-Large + DETR; keywords as in the module docstring."""
    return _detr_pvt("pvt_large", weights, feature_stage, drop_path, kwargs)


def detr_resnet50(weights: str | None = None, **kwargs):
    """ResNet-50 + DETR, the convolutional baseline; loads official DETR-R50 files unchanged."""
    return _detr(ResNet50Backbone(), weights, **kwargs)


def _pvt(variant: str, weights: str | None, kwargs: dict) -> pvt.PyramidVisionTransformer:
    model = getattr(pvt, variant)(**kwargs)
    if weights is not None:
        pvt.load_pvt_checkpoint(model, weights)
    return model


def pvt_tiny(weights: str | None = None, **kwargs) -> pvt.PyramidVisionTransformer:
    """PVT v1 Tiny; keywords of :class:`models.pvt.PyramidVisionTransformer` (``num_classes``
    1000 for the ImageNet classifier, 0 with ``out_indices`` for a backbone)."""
    return _pvt("pvt_tiny", weights, {"num_classes": 1000} | kwargs)


def pvt_small(weights: str | None = None, **kwargs) -> pvt.PyramidVisionTransformer:
    """PVT v1 Small; keywords as in :func:`pvt_tiny`."""
    return _pvt("pvt_small", weights, {"num_classes": 1000} | kwargs)


def pvt_medium(weights: str | None = None, **kwargs) -> pvt.PyramidVisionTransformer:
    """PVT v1 Medium; keywords as in :func:`pvt_tiny`."""
    return _pvt("pvt_medium", weights, {"num_classes": 1000} | kwargs)


def pvt_large(weights: str | None = None, **kwargs) -> pvt.PyramidVisionTransformer:
    """PVT v1 Large; keywords as in :func:`pvt_tiny`."""
    return _pvt("pvt_large", weights, {"num_classes": 1000} | kwargs)
