"""The official Deformable DETR checkpoints (fundamentalvision/Deformable-DETR's
``r50_deformable_detr-checkpoint.pth``, ``r50_deformable_detr_plus_iterative_bbox_refinement
-checkpoint.pth`` and ``r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage
-checkpoint.pth``) in this repository's layout.

Their model is ``--backbone resnet50 --transformer deformable --cls_loss focal --num_classes 91
--num_queries 300``, with ``--box_refine`` for the second and ``--box_refine --two_stage`` for the
third (Deformable DETR's two-stage, not ``--mixed_selection``); everything else is this
repository's default for Deformable DETR. :func:`models.detr.load_detr_checkpoint` (``--finetune``,
``--resume`` of a file without this repository's configuration, ``hubconf``) converts such a
file when it recognises one.

The names differ in four places:

- ``input_proj.<level>.0`` / ``.1`` (the 1x1 convolution and GroupNorm of each backbone level, the
  3x3 stride-2 convolution and GroupNorm of each extra level) are ``input_proj.input_proj.<level>
  .proj`` / ``.norm`` (the 1x1 kernel as a Linear's weight) and ``input_proj.extra_levels.<i>
  .proj`` / ``.norm``;
- without refinement the official ``class_embed.<layer>`` and ``bbox_embed.<layer>`` are one
  module listed once per layer: here one ``class_embed`` and one ``bbox_embed``; with two-stage
  the official heads one past the last layer score the encoder's proposals: here
  ``aids.enc.class_embed`` and ``aids.enc.bbox_embed``, beside ``transformer.enc_output``,
  ``enc_output_norm``, ``pos_trans`` and ``pos_trans_norm``, here ``aids.enc.memory_proj``,
  ``memory_norm``, ``pos_trans`` and ``pos_trans_norm``;
- ``transformer.decoder.bbox_embed`` (and ``class_embed``) repeat the detector's heads: dropped;
- the backbone, the transformer and the query rows keep their names (``backbone.0.body``,
  ``transformer.encoder``/``decoder``, ``level_embed``, ``reference_points``, ``query_embed``).
"""

import re

from torch import Tensor

# The official two-stage modules of the transformer, and their names in the two-stage aid.
_TWO_STAGE = {
    "transformer.enc_output.": "aids.enc.memory_proj.",
    "transformer.enc_output_norm.": "aids.enc.memory_norm.",
    "transformer.pos_trans.": "aids.enc.pos_trans.",
    "transformer.pos_trans_norm.": "aids.enc.pos_trans_norm.",
}
_PROJECTION = re.compile(r"input_proj\.(\d+)\.([01])\.(weight|bias)$")
_HEAD = re.compile(r"(class_embed|bbox_embed)\.(\d+)\.(.+)$")


def is_official_deformable_detr(state_dict: dict[str, Tensor]) -> bool:
    """Whether ``state_dict`` has the official Deformable DETR layout."""
    return "transformer.level_embed" in state_dict and "input_proj.0.0.weight" in state_dict


def from_official_deformable_detr(
    state_dict: dict[str, Tensor],
    backbone_levels: int,
    num_layers: int,
    per_layer_heads: bool,
    two_stage: bool,
    source: str,
) -> dict[str, Tensor]:
    """The official Deformable DETR ``state_dict`` (module docstring) for a model with
    ``backbone_levels`` projected backbone levels and ``num_layers`` decoder layers, with one
    class and box head per layer (``per_layer_heads``: box refinement) or one shared, and
    Deformable DETR's ``two_stage`` selection or none. Raises ValueError naming ``source`` when
    the file's two-stage and the model's differ."""
    file_two_stage = "transformer.pos_trans.weight" in state_dict
    if file_two_stage != two_stage:
        raise ValueError(
            f"{source} is a{' two-stage' if file_two_stage else ' one-stage'} Deformable DETR "
            f"checkpoint; build the model {'with' if file_two_stage else 'without'} --two_stage "
            "(Deformable DETR's, without --mixed_selection)"
        )
    converted = {}
    for key, value in state_dict.items():
        if key.startswith(("transformer.decoder.bbox_embed.", "transformer.decoder.class_embed.")):
            continue
        prefix = next((p for p in _TWO_STAGE if key.startswith(p)), None)
        if prefix is not None:
            key = _TWO_STAGE[prefix] + key.removeprefix(prefix)
        elif match := _PROJECTION.match(key):
            level, part, kind = int(match[1]), match[2], match[3]
            module = "proj" if part == "0" else "norm"
            if level < backbone_levels:
                if module == "proj" and value.dim() == 4:
                    value = value.flatten(1)  # the 1x1 kernel [d, C, 1, 1] as [d, C]
                key = f"input_proj.input_proj.{level}.{module}.{kind}"
            else:
                key = f"input_proj.extra_levels.{level - backbone_levels}.{module}.{kind}"
        elif match := _HEAD.match(key):
            head, layer, rest = match[1], int(match[2]), match[3]
            if two_stage and layer == num_layers:  # the proposals' heads
                converted[f"aids.enc.{head}.{rest}"] = value
                continue
            if layer >= num_layers:
                raise ValueError(
                    f"{source}: {key} is for decoder layer {layer}, the model has {num_layers} "
                    "(set --dec_layers)"
                )
            if not per_layer_heads:
                if layer > 0:
                    continue  # the same module, listed once per layer
                key = f"{head}.{rest}"
        converted[key] = value
    return converted
