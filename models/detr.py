"""DETR: the detector and the loading of official (and our own) DETR checkpoints."""

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.backbone import Joiner
from models.transformer import Transformer
from util import checkpoint as util_checkpoint
from util.checkpoint import load_state_dict_strict
from util.misc import pad_images


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (DETR's box head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True)
        )

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


class DETR(nn.Module):
    """Backbone, linear input projection, transformer, and per-query class and box heads.

    The transformer reads the backbone's last level (the coarsest: PVT's chosen stage, or
    ResNet-50's layer4).
    """

    def __init__(
        self,
        backbone: Joiner,
        transformer: Transformer,
        num_classes: int,
        num_queries: int = 100,
        aux_loss: bool = True,
        size_divisibility: int = 32,
    ):
        """``num_classes`` is the largest category id + 1; the class head adds a no-object
        column. ``aux_loss`` adds the earlier decoder layers' predictions to the output. A list
        of images is padded to a multiple of ``size_divisibility`` (see ``forward``)."""
        super().__init__()
        hidden_dim = transformer.d_model
        self.backbone = backbone
        self.transformer = transformer
        self.input_proj = nn.Linear(backbone.out_channels[-1], hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.aux_loss = aux_loss
        self.size_divisibility = size_divisibility

    def forward(self, images: Tensor | list[Tensor], mask: Tensor | None = None) -> dict:
        """Detect objects in a batch.

        Args:
            images: a padded batch [B, 3, H, W] with the images at the top left, or a list of B
                images [3, H_i, W_i] to pad here to a multiple of ``size_divisibility``. With
                padding to a multiple of 32, an image's outputs do not depend on its batch.
            mask: [B, H, W] bool, True on padding, for a padded batch; None means no padding.

        Returns:
            "pred_logits": [B, Q, num_classes + 1] class logits, the last column no-object.
            "pred_boxes": [B, Q, 4] normalized (cx, cy, w, h) in [0, 1], relative to the
                image's own (unpadded) size.
            "aux_outputs" (with aux_loss): for each earlier decoder layer, a dict with the same
                two keys.
        """
        images, mask = _padded_batch(images, mask, self.size_divisibility)
        features, mask, pos = self.backbone(images, mask)[-1]
        src = self.input_proj(features.flatten(2).transpose(1, 2))
        query_pos = self.query_embed.weight.unsqueeze(0).expand(src.shape[0], -1, -1)
        hs, _ = self.transformer(
            src, mask.flatten(1), query_pos, pos.flatten(2).transpose(1, 2),
            tgt=torch.zeros_like(query_pos),
        )  # fmt: skip
        return self.predict(hs)

    def predict(self, hs: Tensor) -> dict:
        """Class and box heads on the decoder's outputs [num_layers, B, Q, d] -> the outputs
        dict of :meth:`forward`."""
        logits = self.class_embed(hs)
        boxes = self.bbox_embed(hs).sigmoid()
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [
                {"pred_logits": lg, "pred_boxes": bx}
                for lg, bx in zip(logits[:-1], boxes[:-1], strict=True)
            ]
        return out


def _padded_batch(
    images: Tensor | list[Tensor], mask: Tensor | None, size_divisibility: int
) -> tuple[Tensor, Tensor]:
    if isinstance(images, list | tuple):
        if mask is not None:
            raise ValueError("DETR: a list of images is padded here; pass no mask with it")
        return pad_images(list(images), size_divisibility)
    if images.dim() != 4:
        raise ValueError(f"DETR: expected images [B, 3, H, W], got {tuple(images.shape)}")
    batch, _, height, width = images.shape
    if mask is None:
        return images, images.new_zeros(batch, height, width, dtype=torch.bool)
    if mask.dtype != torch.bool or mask.shape != (batch, height, width):
        raise ValueError(
            f"DETR: mask must be bool [B, H, W] = {[batch, height, width]} (True on padding), "
            f"got {mask.dtype} {list(mask.shape)}"
        )
    return images, mask


def load_detr_checkpoint(
    model: DETR, checkpoint: str | os.PathLike | dict[str, Tensor], drop_class_head: bool = False
) -> None:
    """Load DETR weights: an official DETR checkpoint file, one of ours, or a state dict.

    The weights may sit under a "model" key. An official ``input_proj.weight`` 1x1 convolution
    kernel [d, C, 1, 1] becomes the linear weight [d, C]. With ``drop_class_head`` the model keeps
    its own ``class_embed`` (fine-tuning on a dataset with other classes). Anything missing,
    unexpected or mis-shaped raises one ``ValueError`` that lists it.
    """
    source = "the given state dict" if isinstance(checkpoint, dict) else os.fspath(checkpoint)
    if not isinstance(checkpoint, dict):
        checkpoint = util_checkpoint.load(source)
    state_dict = dict(checkpoint.get("model", checkpoint))
    proj = state_dict.get("input_proj.weight")
    if proj is not None and proj.dim() == 4:
        if proj.shape[2:] != (1, 1):
            raise ValueError(f"{source}: input_proj.weight {list(proj.shape)} is not a 1x1 kernel")
        state_dict["input_proj.weight"] = proj.flatten(1)
    own = model.state_dict()
    if drop_class_head:
        state_dict |= {k: own[k] for k in ("class_embed.weight", "class_embed.bias")}
    else:
        _check_class_count(state_dict, own, source)
    load_state_dict_strict(model, state_dict, source)


def _check_class_count(state_dict: dict, own: dict, source: str) -> None:
    file_bias, model_bias = state_dict.get("class_embed.bias"), own["class_embed.bias"]
    if file_bias is None or file_bias.shape == model_bias.shape:
        return
    file_classes = file_bias.shape[0] - 1
    raise ValueError(
        f"{source}: the class head has {file_classes} classes + no-object, the model "
        f"{model_bias.shape[0] - 1}; set --num_classes {file_classes}, or start a run on a new "
        "dataset from it with --finetune, which keeps the model's own class head "
        "(drop_class_head=True from Python)"
    )
