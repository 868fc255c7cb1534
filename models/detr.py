"""DETR: the detector, its set criterion, the post-processing, and official checkpoint loading."""

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou_loss

from models.backbone import Joiner, build_backbone
from models.matcher import HungarianMatcher, build_matcher
from models.transformer import Transformer, build_transformer
from util import checkpoint as util_checkpoint
from util import dist as dist_util
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
    """Backbone, linear input projection, transformer, and per-query class and box heads."""

    def __init__(
        self,
        backbone: Joiner,
        transformer: Transformer,
        num_classes: int,
        num_queries: int = 100,
        aux_loss: bool = True,
    ):
        """``num_classes`` is the largest category id + 1; the class head adds a no-object
        column. ``aux_loss`` adds the earlier decoder layers' predictions to the output."""
        super().__init__()
        hidden_dim = transformer.d_model
        self.backbone = backbone
        self.transformer = transformer
        self.input_proj = nn.Linear(backbone.num_channels, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.aux_loss = aux_loss

    def forward(self, images: Tensor | list[Tensor], mask: Tensor | None = None) -> dict:
        """Detect objects in a batch.

        Args:
            images: a padded batch [B, 3, H, W], or a list of B images [3, H_i, W_i] to pad here.
            mask: [B, H, W] bool, True on padding, for a padded batch; None means no padding.

        Returns:
            "pred_logits": [B, Q, num_classes + 1] class logits, the last column no-object.
            "pred_boxes": [B, Q, 4] normalized (cx, cy, w, h) in [0, 1], relative to the
                image's own (unpadded) size.
            "aux_outputs" (with aux_loss): for each earlier decoder layer, a dict with the same
                two keys.
        """
        images, mask = _padded_batch(images, mask)
        features, mask, pos = self.backbone(images, mask)
        src = self.input_proj(features.flatten(2).transpose(1, 2))
        hs, _ = self.transformer(
            src, mask.flatten(1), self.query_embed.weight, pos.flatten(2).transpose(1, 2)
        )
        logits = self.class_embed(hs)
        boxes = self.bbox_embed(hs).sigmoid()
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [
                {"pred_logits": lg, "pred_boxes": bx}
                for lg, bx in zip(logits[:-1], boxes[:-1], strict=True)
            ]
        return out


def _padded_batch(images: Tensor | list[Tensor], mask: Tensor | None) -> tuple[Tensor, Tensor]:
    if isinstance(images, list | tuple):
        if mask is not None:
            raise ValueError("DETR: a list of images is padded here; pass no mask with it")
        return pad_images(list(images))
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


class SetCriterion(nn.Module):
    """DETR's set loss: Hungarian matching, then one ``loss_*`` method per term.

    Terms ("losses"): "labels" -> loss_ce (cross-entropy over all queries, weight ``eos_coef`` on
    no-object) and class_error (logged: % of matched queries with the wrong class);
    "boxes" -> loss_bbox (L1) and loss_giou (1 - GIoU) over matched pairs, each summed and divided
    by the number of target boxes averaged over processes (at least 1); "cardinality" ->
    cardinality_error (logged: |predicted objects - target objects| per image). Every
    ``aux_outputs`` entry i gets the same terms with the suffix ``_i``. The criterion holds no
    tensors: it runs on the device of the outputs it is given.
    """

    LOSSES = ("labels", "boxes", "cardinality")

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: dict[str, float],
        eos_coef: float,
        losses: tuple[str, ...] = LOSSES,
    ):
        super().__init__()
        unknown = sorted(set(losses) - set(self.LOSSES))
        if unknown:
            raise ValueError(f"unknown loss terms {unknown}; choose from {list(self.LOSSES)}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = eos_coef
        self.losses = tuple(losses)

    def loss_labels(self, outputs, targets, indices, norms: "Normalizers") -> dict[str, Tensor]:
        logits = outputs["pred_logits"]
        matched = _matched_queries(indices)
        matched_labels = _matched_targets(targets, indices, "labels")
        target_classes = torch.full(
            logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device
        )
        target_classes[matched] = matched_labels
        class_weight = torch.ones(self.num_classes + 1, device=logits.device)
        class_weight[-1] = self.eos_coef
        # The weighted mean of DETR, but over the whole batch of all processes, so that N
        # processes compute the same gradient as one process with the N-times batch.
        loss_ce = (
            F.cross_entropy(logits.transpose(1, 2), target_classes, class_weight, reduction="sum")
            / norms.class_weight
        )
        if matched_labels.numel() == 0:
            class_error = logits.new_zeros(())
        else:
            correct = logits[matched].argmax(-1) == matched_labels
            class_error = 100.0 - 100.0 * correct.float().mean()
        return {"loss_ce": loss_ce, "class_error": class_error.detach()}

    def loss_boxes(self, outputs, targets, indices, norms: "Normalizers") -> dict[str, Tensor]:
        # float32 whatever the autocast dtype: boxes are small differences of numbers in [0, 1].
        pred = outputs["pred_boxes"][_matched_queries(indices)].float()
        target = _matched_targets(targets, indices, "boxes").float()
        loss_bbox = F.l1_loss(pred, target, reduction="sum")
        loss_giou = generalized_box_iou_loss(_xyxy(pred), _xyxy(target), reduction="sum")
        return {"loss_bbox": loss_bbox / norms.boxes, "loss_giou": loss_giou / norms.boxes}

    @torch.no_grad()
    def loss_cardinality(self, outputs, targets, indices, norms) -> dict[str, Tensor]:
        logits = outputs["pred_logits"]
        num_predicted = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).float()
        num_targets = torch.as_tensor(
            [len(t["labels"]) for t in targets], dtype=torch.float32, device=logits.device
        )
        return {"cardinality_error": F.l1_loss(num_predicted, num_targets)}

    def forward(self, outputs: dict, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Losses and logged metrics for one batch.

        Args:
            outputs: DETR's output ("pred_logits" [B, Q, K + 1], "pred_boxes" [B, Q, 4]
                normalized cxcywh, optional "aux_outputs").
            targets: B dicts with "labels" [n_i] int64 and "boxes" [n_i, 4] normalized cxcywh.

        Returns:
            loss_ce, loss_bbox, loss_giou, class_error, cardinality_error, and the same names
            with ``_0``, ``_1``, ... for each auxiliary output. Scalar tensors.
        """
        norms = self._normalizers(targets, outputs["pred_logits"])
        losses = self._losses(outputs, targets, norms, suffix="")
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            losses.update(self._losses(aux, targets, norms, suffix=f"_{i}"))
        return losses

    def _normalizers(self, targets: list[dict[str, Tensor]], logits: Tensor) -> "Normalizers":
        """The divisors of the loss terms, averaged over processes in one all-reduce.

        The box losses divide by the number of target boxes (at least 1); the class loss by the
        sum of its class weights: each image matches min(n_i, Q) queries (weight 1) and leaves
        the rest to no-object (weight eos_coef), the same for every decoder layer.
        """
        num_queries = logits.shape[1]
        boxes = sum(len(t["labels"]) for t in targets)
        matched = sum(min(len(t["labels"]), num_queries) for t in targets)
        unmatched = num_queries * len(targets) - matched
        values = _mean_over_processes(
            torch.tensor([boxes, matched + self.eos_coef * unmatched], device=logits.device)
        )
        return Normalizers(boxes=values[0].clamp(min=1), class_weight=values[1])

    def _losses(self, outputs, targets, norms: "Normalizers", suffix: str) -> dict[str, Tensor]:
        indices = self.matcher(outputs, targets)
        losses = {}
        for name in self.losses:
            losses.update(getattr(self, f"loss_{name}")(outputs, targets, indices, norms))
        return {name + suffix: value for name, value in losses.items()}


def _matched_queries(indices: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """(batch index, query index) of every matched query, for advanced indexing of [B, Q, ...]."""
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    return batch_idx, torch.cat([src for src, _ in indices])


def _matched_targets(targets: list[dict], indices: list[tuple[Tensor, Tensor]], key: str) -> Tensor:
    """The matched targets' ``key`` entries, in the order of :func:`_matched_queries`."""
    return torch.cat([t[key][j] for t, (_, j) in zip(targets, indices, strict=True)])


def _xyxy(boxes: Tensor) -> Tensor:
    return box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy")


class Normalizers(NamedTuple):
    boxes: Tensor  # target boxes per process, averaged over processes, at least 1
    class_weight: Tensor  # class-loss weight per process, averaged over processes


def _mean_over_processes(value: Tensor) -> Tensor:
    """Values averaged over processes when distributed (no gradient flows through them)."""
    value = value.detach().clone()
    if dist_util.is_initialized():
        torch.distributed.all_reduce(value)
        value = value / dist_util.world_size()
    return value


def build_weight_dict(
    bbox_loss_coef: float, giou_loss_coef: float, num_aux_outputs: int
) -> dict[str, float]:
    """Loss weights: loss_ce 1, loss_bbox and loss_giou as given; the same for each aux output."""
    weights = {"loss_ce": 1.0, "loss_bbox": bbox_loss_coef, "loss_giou": giou_loss_coef}
    aux = {f"{k}_{i}": v for i in range(num_aux_outputs) for k, v in weights.items()}
    return weights | aux


class PostProcess(nn.Module):
    """DETR's output -> per-image scores, labels and absolute (x0, y0, x1, y1) boxes."""

    @torch.no_grad()
    def forward(self, outputs: dict, orig_sizes: Tensor) -> list[dict[str, Tensor]]:
        """outputs: "pred_logits" [B, Q, K + 1], "pred_boxes" [B, Q, 4] normalized cxcywh;
        orig_sizes: [B, 2] (height, width) of the original images.

        Returns B dicts: "scores" [Q] (best class probability, no-object excluded),
        "labels" [Q] int64 category ids, "boxes" [Q, 4] absolute xyxy in the original image.
        """
        # float32 even under autocast: bfloat16 would put boxes pixels off in a large image.
        logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
        if orig_sizes.shape != (logits.shape[0], 2):
            raise ValueError(
                f"PostProcess: orig_sizes must be [B, 2] = [{logits.shape[0]}, 2] (height, width),"
                f" got {list(orig_sizes.shape)}"
            )
        scores, labels = logits.softmax(-1)[..., :-1].max(-1)
        height, width = orig_sizes.float().unbind(1)
        scale = torch.stack([width, height, width, height], dim=1)[:, None, :]
        boxes = _xyxy(boxes) * scale
        return [
            {"scores": s, "labels": lb, "boxes": b}
            for s, lb, b in zip(scores, labels, boxes, strict=True)
        ]


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
        f"{model_bias.shape[0] - 1}; set --num_classes {file_classes}, or drop the class head "
        "to fine-tune on a new dataset (drop_class_head=True)"
    )


def build(args) -> tuple[DETR, SetCriterion, dict[str, nn.Module]]:
    """(model, criterion, {"bbox": PostProcess()}) from the command-line flags."""
    if args.num_classes < 1:
        raise ValueError(
            f"--num_classes must be >= 1 (largest category id + 1), got {args.num_classes}"
        )
    aux_loss = not args.no_aux_loss
    model = DETR(
        build_backbone(args),
        build_transformer(args),
        num_classes=args.num_classes,
        num_queries=args.num_queries,
        aux_loss=aux_loss,
    )
    weight_dict = build_weight_dict(
        args.bbox_loss_coef, args.giou_loss_coef, args.dec_layers - 1 if aux_loss else 0
    )
    criterion = SetCriterion(args.num_classes, build_matcher(args), weight_dict, args.eos_coef)
    return model, criterion, {"bbox": PostProcess()}
