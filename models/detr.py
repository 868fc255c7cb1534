"""DETR: the detector and the loading of official (and our own) DETR checkpoints."""

import math
import os

import torch
from torch import Tensor, nn

from models.aids.base import Aid, QueryBlock, self_attention_mask
from models.backbone import Joiner
from models.classification import ClassHead, SoftmaxClassification
from models.deformable_checkpoint import from_official_deformable_detr, is_official_deformable_detr
from models.mlp import MLP, LayerHeads
from models.neck import InputLevels
from models.protocol import Decoded, Memory, Queries, Transformer
from util import checkpoint as util_checkpoint
from util.checkpoint import load_state_dict_strict
from util.misc import pad_images


class DETR(nn.Module):
    """The detector: backbone, neck, transformer, per-query class and box heads, training aids.

    The parts follow :mod:`models.protocol`: the backbone's levels go through the neck (the
    transformer's input levels, ``input_proj``) into the transformer's encoder, whose memory the
    decoder reads with the queries. DETR's transformer (:mod:`models.transformer`) reads the
    backbone's last level (the coarsest: PVT's chosen stage, or ResNet-50's layer4); the
    deformable one (:mod:`models.deformable`) reads several. The class head follows
    ``class_head``'s convention (default DETR's: ``num_classes + 1`` logits, the last
    no-object); the box head is the transformer's (:meth:`box_heads`: DETR's MLP, or Deformable
    DETR's per-layer heads).

    ``aids`` are training aids (:mod:`models.aids`): with none this is DETR as published, with
    its parameter names. Each is a submodule under ``aids.<name>``; the model calls their hooks
    (:class:`models.aids.base.Aid`) and knows nothing else of them. In evaluation mode the model
    runs ``num_queries`` matching queries and no training-only query: the cost and the outputs of
    a plain model with the same weights.
    """

    def __init__(
        self,
        backbone: Joiner,
        input_proj: nn.Module,
        transformer: Transformer,
        num_classes: int,
        num_queries: int = 100,
        aux_loss: bool = True,
        size_divisibility: int = 32,
        class_head: ClassHead | None = None,
        aids: list[Aid] | tuple[Aid, ...] = (),
    ):
        """``input_proj`` is the neck (the transformer's ``build_neck``). ``num_classes`` is the
        largest category id + 1. ``aux_loss`` adds the earlier decoder layers' predictions to
        the output. A list of images is padded to a multiple of ``size_divisibility`` (see
        ``forward``)."""
        super().__init__()
        sources = [aid for aid in aids if aid.provides_queries]
        if len(sources) > 1:
            names = [aid.name for aid in sources]
            raise ValueError(f"aids {names} each represent the queries; enable one of them")
        extras = [aid for aid in aids if aid.extra_queries]
        if len(extras) > 1:
            names = [aid.name for aid in extras]
            raise ValueError(f"aids {names} each add extra queries; enable one of them")
        hidden_dim = transformer.d_model
        self.backbone = backbone
        self.transformer = transformer
        self.input_proj = input_proj
        self.query_multiplier = math.prod(aid.query_multiplier for aid in aids)
        self.extra_queries = sum(aid.extra_queries for aid in aids)
        slots = num_queries * self.query_multiplier + self.extra_queries
        # Learned query rows, unless an aid represents the queries or selects them whole.
        if not sources and not any(aid.gives_content for aid in aids):
            self.query_embed = nn.Embedding(slots, transformer.query_dim)
        self.class_head = class_head or SoftmaxClassification()
        class_embed = nn.Linear(hidden_dim, self.class_head.num_logits(num_classes))
        self.class_head.init_head(class_embed)
        self.class_embed = transformer.class_heads(class_embed)
        self.bbox_embed = transformer.box_heads(MLP(hidden_dim, hidden_dim, 4, 3))
        self.aids = nn.ModuleDict({aid.name: aid for aid in aids})
        for aid in sources:
            aid.build_queries(slots)
        for aid in aids:
            aid.init_heads(self.class_embed, self.bbox_embed)
        self.num_classes = num_classes
        self.num_queries = num_queries
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
                [n_i] and "boxes" [n_i, 4] normalized cxcywh), for the aids that make queries
                from them in training; the model reads them nowhere else.

        Returns:
            "pred_logits": [B, Q, C] class logits (DETR's: C = num_classes + 1, the last
                no-object).
            "pred_boxes": [B, Q, 4] normalized (cx, cy, w, h) in [0, 1], relative to the
                image's own (unpadded) size.
            "aux_outputs" (with aux_loss): for each earlier decoder layer, a dict with the same
                two keys.
            In training only, the prediction sets of the aids' query blocks as
            "<name>_outputs" (:class:`models.aids.base.QueryBlock`), for
            :class:`models.criterion.SetCriterion`.
        """
        images, mask = _padded_batch(images, mask, self.size_divisibility)
        memory = self._encode(images, mask)
        slots = self.num_queries
        if self.training:
            slots = slots * self.query_multiplier + self.extra_queries
        pool = self._initial_queries(slots, images.shape[0])
        selected = {}
        for aid in self.aids.values():
            pool, sets = aid.select_queries(pool, memory)
            selected |= sets
        blocks = []
        if self.training:
            for aid in self.aids.values():
                blocks += aid.training_blocks(pool, self.num_queries, targets)
        queries = Queries.cat([pool[: self.num_queries], *(b.queries for b in blocks)])
        attn_mask = self_attention_mask(self.num_queries, blocks, images.device)
        hs, boxes = self._decode(queries, memory, attn_mask)
        out = self.predict(hs[:, :, : self.num_queries], _part(boxes, 0, self.num_queries))
        if self.training:
            out |= selected
        start = self.num_queries
        for block in blocks:
            end = start + len(block.queries)
            out[f"{block.name}_outputs"] = self._block_outputs(
                block, hs[:, :, start:end], _part(boxes, start, end)
            )
            start = end
        if self.training:
            for aid in self.aids.values():
                aid.adapt_outputs(out)
        return out

    def _encode(self, images: Tensor, mask: Tensor) -> Memory:
        """The backbone's levels through the neck and the encoder; images [B, 3, H, W], mask
        [B, H, W] bool (True on padding)."""
        levels = self.input_proj(self.backbone(images, mask), self.backbone[1])
        return self.transformer.encode(levels)

    def _query_source(self) -> Aid | None:
        return next((aid for aid in self.aids.values() if aid.provides_queries), None)

    def _initial_queries(self, count: int, batch: int) -> Queries:
        """The first ``count`` learned queries, as every aid adapts them."""
        source = self._query_source()
        if source is not None:
            queries = source.initial_queries(count, batch)
        elif hasattr(self, "query_embed"):
            rows = self.query_embed.weight[:count].unsqueeze(0).expand(batch, -1, -1)
            queries = Queries(*self.transformer.learned_queries(rows))
        else:  # slots that an aid's selection fills with content and position
            empty = self.class_bias.new_zeros(batch, count, self.transformer.d_model)
            queries = Queries(empty, empty)
        for aid in self.aids.values():
            queries = aid.adapt_queries(queries)
        return queries

    def _decode(self, queries: Queries, memory: Memory, attn_mask: Tensor | None) -> Decoded:
        """The transformer's decoder over the queries, or the decoder of the aid that
        represents them."""
        decoder = self._query_source() or self.transformer
        return decoder.decode(queries, memory, attn_mask, self.bbox_embed)

    def _block_outputs(self, block: QueryBlock, hs: Tensor, boxes: Tensor | None) -> dict | list:
        """A query block's prediction sets, each carrying the block's scoring."""
        count = block.prediction_sets or 1
        size = hs.shape[2] // count
        sets = []
        for i in range(count):
            part = slice(i * size, (i + 1) * size)
            one = self.predict(hs[:, :, part], None if boxes is None else boxes[:, :, part])
            for entry in [one, *one.get("aux_outputs", [])]:
                entry.update(block.scoring())
            sets.append(one)
        return sets if block.prediction_sets else sets[0]

    def predict(self, hs: Tensor, boxes: Tensor | None = None) -> dict:
        """Class and box heads on the decoder's outputs [num_layers, B, Q, d] -> the outputs
        dict of :meth:`forward` (without its training-only sets). ``boxes`` [num_layers, B, Q,
        4]: the boxes when the decoding step computes them (relative to anchors or reference
        points); None: the box head's."""
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

    def class_count_keys(self) -> tuple[str, ...]:
        """The parameters whose shape follows the class count (the class head's, the aids')."""
        aids = [
            f"aids.{aid.name}.{key}" for aid in self.aids.values() for key in aid.class_count_keys
        ]
        return (*(f"class_embed.{key}" for key in self.class_embed.state_dict()), *aids)

    @property
    def class_bias(self) -> Tensor:
        """The class head's bias (the first layer's, with per-layer heads): [num_logits]."""
        head = self.class_embed
        return head.bias if isinstance(head, nn.Linear) else head[0].bias


def class_bias(state_dict: dict[str, Tensor]) -> Tensor | None:
    """A detector state dict's class-head bias (the first layer's with per-layer heads), whose
    length gives the class count, or None."""
    bias = state_dict.get("class_embed.bias")
    return state_dict.get("class_embed.0.bias") if bias is None else bias


def _part(boxes: Tensor | None, start: int, end: int) -> Tensor | None:
    return None if boxes is None else boxes[:, :, start:end]


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
    kernel [d, C, 1, 1] becomes the linear weight [d, C]; an official Deformable DETR checkpoint
    is converted (:mod:`models.deformable_checkpoint`). With ``drop_class_head`` the model keeps
    its own ``class_embed`` (and label embedding of denoising queries: fine-tuning on a dataset
    with other classes). Anything missing,
    unexpected or mis-shaped raises one ``ValueError`` that lists it.
    """
    source = "the given state dict" if isinstance(checkpoint, dict) else os.fspath(checkpoint)
    if not isinstance(checkpoint, dict):
        checkpoint = util_checkpoint.load(source)
    state_dict = dict(checkpoint.get("model", checkpoint))
    if is_official_deformable_detr(state_dict):
        state_dict = _from_official_deformable_detr(state_dict, model, source)
    _class_head_per_layer(state_dict, model)
    proj = state_dict.get("input_proj.weight")
    if proj is not None and proj.dim() == 4:
        if proj.shape[2:] != (1, 1):
            raise ValueError(f"{source}: input_proj.weight {list(proj.shape)} is not a 1x1 kernel")
        state_dict["input_proj.weight"] = proj.flatten(1)
    own = model.state_dict()
    if drop_class_head:
        state_dict |= {k: own[k] for k in model.class_count_keys()}
    else:
        _check_class_count(state_dict, model, source)
    load_state_dict_strict(model, state_dict, source)


def _from_official_deformable_detr(state_dict: dict, model: DETR, source: str) -> dict:
    """An official Deformable DETR checkpoint's weights for ``model``, which must be a
    Deformable DETR (raises ValueError naming ``source`` otherwise)."""
    if not isinstance(model.input_proj, InputLevels):
        raise ValueError(
            f"{source} is an official Deformable DETR checkpoint; build the model with "
            "--transformer deformable --backbone resnet50 --cls_loss focal --num_classes 91 "
            "--num_queries 300 (and --box_refine, --box_refine --two_stage for the box-refinement "
            "and two-stage checkpoints)"
        )
    return from_official_deformable_detr(
        state_dict,
        backbone_levels=len(model.input_proj.input_proj),
        num_layers=len(model.transformer.decoder.layers),
        per_layer_heads=isinstance(model.class_embed, LayerHeads),
        two_stage="enc" in model.aids and model.aids["enc"].gives_content,
        source=source,
    )


def _class_head_per_layer(state_dict: dict, model: DETR) -> None:
    """A file with one class head (``class_embed.weight``), for a model with one per decoder
    layer (box refinement, ``class_embed.<layer>.weight``): each layer starts from the file's
    head. In place."""
    if "class_embed.weight" not in state_dict or not isinstance(model.class_embed, LayerHeads):
        return
    weight, bias = state_dict.pop("class_embed.weight"), state_dict.pop("class_embed.bias", None)
    for layer in range(len(model.class_embed)):
        state_dict[f"class_embed.{layer}.weight"] = weight
        if bias is not None:
            state_dict[f"class_embed.{layer}.bias"] = bias


def _check_class_count(state_dict: dict, model: DETR, source: str) -> None:
    file_bias, own_bias = class_bias(state_dict), model.class_bias
    if file_bias is None or file_bias.shape == own_bias.shape:
        return
    file_classes = model.class_head.num_classes(file_bias.shape[0])
    raise ValueError(
        f"{source}: the class head has {file_bias.shape[0]} outputs ({file_classes} classes), "
        f"the model {own_bias.shape[0]} ({model.num_classes} classes); set "
        f"--num_classes {file_classes}, or start a run on a new dataset from it with --finetune, "
        "which keeps the model's own class head (drop_class_head=True from Python)"
    )
