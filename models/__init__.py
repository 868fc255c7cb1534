"""The detector: ``build_model(args) -> (model, criterion, postprocessors)``."""

from models.detr import build


def build_model(args):
    """(DETR model, SetCriterion, {"bbox": PostProcess()}) from the command-line flags."""
    return build(args)
