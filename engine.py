"""One training epoch and one evaluation pass; :class:`training.Run` loops over them."""

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from models.criterion import loss_weight
from util import dist

Batch = tuple[Tensor, Tensor, list[dict[str, Tensor]]]


def to_device(batch: Batch, device: torch.device) -> Batch:
    images, mask, targets = batch
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
    return images.to(device, non_blocking=True), mask.to(device, non_blocking=True), targets


def run_model(
    model: nn.Module,
    images: Tensor,
    mask: Tensor,
    amp_dtype: torch.dtype | None,
    targets: list[dict[str, Tensor]] | None = None,
) -> dict:
    """``model(images, mask)`` under autocast when ``amp_dtype`` is set; outputs in float32.

    ``targets`` are passed on as ``model(images, mask, targets=targets)`` when given (training:
    denoising queries are made from them)."""
    extra = {} if targets is None else {"targets": targets}
    with torch.autocast(
        images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
    ):
        outputs = model(images, mask, **extra)
    return _to_float(outputs)


def _to_float(value):
    if isinstance(value, Tensor):  # floating point only: index tensors ("indices") stay ints
        return value.float() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _to_float(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_float(v) for v in value]
    return value


def check_finite(loss: Tensor, loss_dict: dict[str, Tensor], epoch: int, iteration: int) -> None:
    """Stop, naming the term and the iteration, when the loss is NaN or infinite on any process.

    The flag is agreed across processes so that every process stops together.
    """
    finite = torch.isfinite(loss.detach()).to(torch.int32)
    if dist.is_initialized():
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    if finite.item():
        return
    bad = [f"{k}={v.item()}" for k, v in loss_dict.items() if not torch.isfinite(v).all()]
    where = ", ".join(bad) if bad else "on another process"
    raise FloatingPointError(
        f"non-finite loss at epoch {epoch}, iteration {iteration}: {where}. Training stopped; "
        "the last checkpoint is untouched. Try a lower --lr, --clip_max_norm, or --amp none."
    )


class Averager:
    """Running means of scalar metrics, averaged over processes on :meth:`result`.

    ``state`` (``{"sums": {name: float}, "count": int}``, from :meth:`state`) continues the sums
    of an epoch stopped part-way.
    """

    def __init__(self, state: dict | None = None):
        self.sums: dict[str, float] = defaultdict(float, state["sums"] if state else {})
        self.count = state["count"] if state else 0

    def state(self) -> dict:
        """The sums and the count so far, as plain data (checkpoints hold it)."""
        return {"sums": dict(self.sums), "count": self.count}

    def add(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.sums[k] += v
        self.count += 1

    def result(self, device: torch.device) -> dict[str, float]:
        means = {k: v / max(self.count, 1) for k, v in self.sums.items()}
        return dist.all_reduce_mean(means, device)


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    loader: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    epoch: int,
    max_norm: float = 0.0,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
    averager: Averager | None = None,
    after_step: Callable[[Averager], None] | None = None,
    log_step: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Train for one pass over ``loader``; the scheduler steps every iteration.

    Returns the epoch means of ``loss`` (weighted total), every loss term and metric of the
    criterion, ``lr`` and ``grad_norm``, averaged over processes. An epoch resumed part-way
    passes the ``averager`` it had (its count is the number of iterations done) and a
    ``loader`` that yields the remaining batches only. ``after_step(averager)`` runs after every
    optimizer step: where the run saves, or stops. ``log_step(iteration, scalars)`` gets the
    :func:`step_scalars` of every step.
    """
    model.train()
    criterion.train()
    averager = Averager() if averager is None else averager
    with tqdm(
        loader,
        desc=f"epoch {epoch}",
        initial=averager.count,
        total=averager.count + len(loader) if hasattr(loader, "__len__") else None,
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:  # closed on an error too: its line ends before the error's
        start, seen = time.perf_counter(), 0
        for batch in bar:
            iteration = averager.count
            images, mask, targets = to_device(batch, device)
            outputs = run_model(model, images, mask, amp_dtype, targets)
            loss_dict = criterion(outputs, targets)
            loss = criterion.weighted_total(loss_dict)
            check_finite(loss, loss_dict, epoch, iteration)
            grad_norm, lrs = optimizer_step(loss, model, optimizer, lr_scheduler, max_norm)
            seen += images.shape[0]
            images_per_s = seen / (time.perf_counter() - start)
            stats = {"loss": loss.item(), "lr": lrs[0], "grad_norm": grad_norm.item()}
            terms = {k: v.item() for k, v in loss_dict.items()}
            averager.add(stats | terms)
            bar.set_postfix(
                loss=f"{stats['loss']:.3f}", lr=f"{lrs[0]:.1e}", img_s=f"{images_per_s:.1f}"
            )
            if log_step is not None:
                weights = criterion.weight_dict
                log_step(iteration, step_scalars(stats["loss"], terms, weights, lrs, images_per_s))
            if after_step is not None:
                after_step(averager)
    return averager.result(device)


def optimizer_step(
    loss: Tensor,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    max_norm: float,
) -> tuple[Tensor, list[float]]:
    """Backpropagate ``loss``, clip the gradients to ``max_norm`` (0: no clipping), step the
    optimizer, then the schedule; the gradient norm before clipping and the learning rate of
    each parameter group that the step used."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else math.inf)
    optimizer.step()
    lrs = [group["lr"] for group in optimizer.param_groups]
    lr_scheduler.step()
    return grad_norm, lrs


def step_scalars(
    loss: float,
    terms: dict[str, float],
    weight_dict: dict[str, float],
    lrs: list[float],
    images_per_s: float,
) -> dict[str, float]:
    """One training step's scalars: ``loss`` (the weighted total), every term of it times its
    weight (``loss_ce``, ``loss_bbox_0``, ...: the criterion's ``terms`` that ``weight_dict``
    weighs), ``lr_group{i}`` for each parameter group, and ``images_per_s``: this process's
    images per second since the epoch began times the number of processes."""
    weighted = {}
    for name, value in terms.items():
        weight = loss_weight(name, weight_dict)
        if weight is not None:
            weighted[name] = weight * value
    groups = {f"lr_group{i}": lr for i, lr in enumerate(lrs)}
    return {"loss": loss} | weighted | groups | {"images_per_s": images_per_s * dist.world_size()}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    criterion: nn.Module,
    postprocessor: nn.Module,
    loader: Iterable[Batch],
    evaluators: dict,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Losses on ``loader`` and the COCO box metrics (AP, AP50, ... AR100) of each evaluator.

    ``evaluators``: {prefix: evaluator}, e.g. {"coco": CocoEvaluator(gt), "coco_nms": ...}; each
    has ``update({image_id: {scores, labels, boxes}})``, ``synchronize()`` and
    ``summarize() -> dict``. Losses come back averaged over processes, the metrics of each
    evaluator as ``{prefix}_{name}`` (``coco_AP``, ``coco_nms_AP``, ...).
    """
    model.eval()
    criterion.eval()
    averager = Averager()
    for batch in tqdm(loader, desc="eval", disable=not progress, dynamic_ncols=True):
        images, mask, targets = to_device(batch, device)
        outputs = run_model(model, images, mask, amp_dtype)
        loss_dict = criterion(outputs, targets)
        loss = criterion.weighted_total(loss_dict)
        averager.add({"loss": loss.item()} | {k: v.item() for k, v in loss_dict.items()})
        orig_sizes = torch.stack([t["orig_size"] for t in targets])
        results = postprocessor(outputs, orig_sizes)
        by_image = {int(t["image_id"]): r for t, r in zip(targets, results, strict=True)}
        for evaluator in evaluators.values():
            evaluator.update(by_image)
    stats = averager.result(device)
    for prefix, evaluator in evaluators.items():
        evaluator.synchronize()
        stats |= {f"{prefix}_{k}": v for k, v in evaluator.summarize().items()}
    return stats
