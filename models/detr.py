"""DETR: the detector and the loading of official (and our own) DETR checkpoints."""

import os

import torch
from torch import Tensor, nn

from models.backbone import Joiner
from models.denoising import DenoisingQueries, NoisedTargets
from models.mlp import MLP
from models.queries import AnchorQueries, self_attention_mask
from models.transformer import Transformer
from util import checkpoint as util_checkpoint
from util.checkpoint import load_state_dict_strict
from util.misc import pad_images


class DETR(nn.Module):
    """Backbone, linear input projection, transformer, and per-query class and box heads.

    The transformer reads the backbone's last level (the coarsest: PVT's chosen stage, or
    ResNet-50's layer4).

    Three training devices are switches; with all of them off this is DETR as published, with
    its parameter names. ``query_groups`` K > 1 trains K groups of ``num_queries`` queries that
    share the decoder but not their self-attention, each matched and scored on its own (Group
    DETR). ``anchor_queries`` makes each query a learned anchor box, refined by every decoder
    layer (DAB-DETR, :mod:`models.queries`). ``dn_groups`` N > 0, with anchor queries, adds N
    groups of noised ground-truth boxes and labels as queries in training (DN-DETR,
    :mod:`models.denoising`). In evaluation mode the model runs group 0 alone and no denoising
    queries: the cost and the outputs of a plain model with the same weights.
    """

    def __init__(
        self,
        backbone: Joiner,
        transformer: Transformer,
        num_classes: int,
        num_queries: int = 100,
        aux_loss: bool = True,
        size_divisibility: int = 32,
        query_groups: int = 1,
        anchor_queries: bool = False,
        dn_groups: int = 0,
        dn_box_noise: float = 0.4,
        dn_label_noise: float = 0.2,
    ):
        """``num_classes`` is the largest category id + 1; the class head adds a no-object
        column. ``aux_loss`` adds the earlier decoder layers' predictions to the output. A list
        of images is padded to a multiple of ``size_divisibility`` (see ``forward``). The
        switches are those of the class docstring; ``dn_box_noise`` and ``dn_label_noise`` are
        the denoising queries' noise (:mod:`models.denoising`)."""
        super().__init__()
        if query_groups < 1:
            raise ValueError(f"query_groups must be >= 1 (1: plain DETR), got {query_groups}")
        if dn_groups and not anchor_queries:
            raise ValueError("denoising queries are noised anchor boxes: set anchor_queries too")
        hidden_dim = transformer.d_model
        self.backbone = backbone
        self.transformer = transformer
        self.input_proj = nn.Linear(backbone.out_channels[-1], hidden_dim)
        if not anchor_queries:
            self.query_embed = nn.Embedding(num_queries * query_groups, hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.anchor_queries = None
        self.denoising = None
        if anchor_queries:
            layers = len(transformer.decoder.layers)
            self.anchor_queries = AnchorQueries(num_queries * query_groups, hidden_dim, layers)
            # The box head predicts offsets from the anchors, none at first (DAB-DETR).
            nn.init.zeros_(self.bbox_embed.layers[-1].weight)
            nn.init.zeros_(self.bbox_embed.layers[-1].bias)
        if dn_groups:
            self.denoising = DenoisingQueries(
                num_classes, hidden_dim, dn_groups, dn_box_noise, dn_label_noise
            )
        self.num_queries = num_queries
        self.query_groups = query_groups
        self.aux_loss = aux_loss
        self.size_divisibility = size_divisibility

    def forward(
        self,
        images: Tensor | list[Tensor],
        mask: Tensor | None = None,
        targets: list[dict[str, Tensor]] | None = None,
    ) -> dict:
        """Detect objects in a batch.

        Args:
            images: a padded batch [B, 3, H, W] with the images at the top left, or a list of B
                images [3, H_i, W_i] to pad here to a multiple of ``size_divisibility``. With
                padding to a multiple of 32, an image's outputs do not depend on its batch.
            mask: [B, H, W] bool, True on padding, for a padded batch; None means no padding.
            targets: the batch's targets as the criterion takes them (B dicts with "labels"
                [n_i] and "boxes" [n_i, 4] normalized cxcywh): the denoising queries are made
                from them in training (required there); no other part of the model reads them.

        Returns:
            "pred_logits": [B, Q, num_classes + 1] class logits, the last column no-object.
            "pred_boxes": [B, Q, 4] normalized (cx, cy, w, h) in [0, 1], relative to the
                image's own (unpadded) size.
            "aux_outputs" (with aux_loss): for each earlier decoder layer, a dict with the same
                two keys.
            In training only, for :class:`models.criterion.SetCriterion`:
            "group_outputs" (query_groups K > 1): the sets of groups 1..K-1, each a dict as
                above (group 0 is the outputs themselves); every set of every group carries
                "loss_weight" 1 / K, so that the loss is the mean over the groups.
            "dn_outputs" (dn_groups): the denoising queries' set, "pred_logits"
                [B, D, num_classes + 1] and "pred_boxes" [B, D, 4] with D = dn_groups times the
                batch's largest object count, and its "aux_outputs"; each carries "indices",
                the query answering each target.
        """
        images, mask = _padded_batch(images, mask, self.size_divisibility)
        features, mask, pos = self.backbone(images, mask)[-1]
        src = self.input_proj(features.flatten(2).transpose(1, 2))
        mask, pos = mask.flatten(1), pos.flatten(2).transpose(1, 2)
        groups = self.query_groups if self.training else 1
        if self.anchor_queries is not None:
            return self._decode_anchors(src, mask, pos, groups, targets)
        query_pos = self.query_embed.weight[: groups * self.num_queries]
        query_pos = query_pos.unsqueeze(0).expand(src.shape[0], -1, -1)
        hs, _ = self.transformer(
            src, mask, query_pos, pos, tgt=torch.zeros_like(query_pos),
            self_attn_mask=self_attention_mask(self.num_queries, groups, device=src.device),
        )  # fmt: skip
        return self._outputs(hs, None, groups)

    def _decode_anchors(
        self, src: Tensor, mask: Tensor, pos: Tensor, groups: int, targets: list[dict] | None
    ) -> dict:
        """The transformer with anchor queries (and denoising queries in training)."""
        batch, count = src.shape[0], groups * self.num_queries
        anchors = self.anchor_queries.initial_anchors(count).expand(batch, -1, -1)
        if self.denoising is None:
            content = src.new_zeros(batch, count, src.shape[-1])
        else:
            content = self.denoising.matching_content(count).expand(batch, -1, -1)
        dn = None
        if self.training and self.denoising is not None:
            if targets is None:
                raise ValueError(
                    "denoising queries (dn_groups) are made from the targets in training: "
                    "call model(images, mask, targets=targets)"
                )
            dn_content, dn = self.denoising(targets)
            content = torch.cat([dn_content, content], dim=1)
            anchors = torch.cat([dn.boxes.to(anchors.dtype), anchors], dim=1)
        attn_mask = self_attention_mask(
            self.num_queries, groups, dn_valid=None if dn is None else dn.valid,
            dn_groups=0 if dn is None else self.denoising.groups, device=src.device,
        )  # fmt: skip
        memory = self.transformer.encoder(src, pos, mask)
        hs, boxes = self.anchor_queries(
            self.transformer.decoder, content, anchors, memory, pos, mask, attn_mask,
            self.bbox_embed,
        )  # fmt: skip
        return self._outputs(hs, boxes, groups, dn)

    def _outputs(
        self, hs: Tensor, boxes: Tensor | None, groups: int, dn: NoisedTargets | None = None
    ) -> dict:
        """The prediction sets of the decoder's queries, laid out [denoising | group 0 | ...]."""
        start = 0 if dn is None else dn.labels.shape[1]
        sets = []
        for group in range(groups):
            part = slice(start + group * self.num_queries, start + (group + 1) * self.num_queries)
            sets.append(self.predict(hs[:, :, part], None if boxes is None else boxes[:, :, part]))
        out = sets[0]
        if groups > 1:
            for one in sets:
                for entry in [one, *one.get("aux_outputs", [])]:
                    entry["loss_weight"] = 1.0 / groups
            out["group_outputs"] = sets[1:]
        if dn is not None:
            out["dn_outputs"] = self.predict(hs[:, :, :start], boxes[:, :, :start])
            for entry in [out["dn_outputs"], *out["dn_outputs"].get("aux_outputs", [])]:
                entry["indices"] = dn.indices
        return out

    def predict(self, hs: Tensor, boxes: Tensor | None = None) -> dict:
        """Class and box heads on the decoder's outputs [num_layers, B, Q, d] -> the outputs
        dict of :meth:`forward` (without its training-only sets). ``boxes`` [num_layers, B, Q,
        4]: the boxes when the decoder refines them itself (anchor queries); None: the box
        head's."""
        logits = self.class_embed(hs)
        if boxes is None:
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


# The parameters whose shape follows the class count (the last only with denoising queries).
CLASS_COUNT_KEYS = ("class_embed.weight", "class_embed.bias", "denoising.label_embed.weight")


def load_detr_checkpoint(
    model: DETR, checkpoint: str | os.PathLike | dict[str, Tensor], drop_class_head: bool = False
) -> None:
    """Load DETR weights: an official DETR checkpoint file, one of ours, or a state dict.

    The weights may sit under a "model" key. An official ``input_proj.weight`` 1x1 convolution
    kernel [d, C, 1, 1] becomes the linear weight [d, C]. With ``drop_class_head`` the model keeps
    its own ``class_embed`` (and label embedding of denoising queries: fine-tuning on a dataset
    with other classes). Anything missing,
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
        state_dict |= {k: own[k] for k in CLASS_COUNT_KEYS if k in own}
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
