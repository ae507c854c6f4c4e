"""Contrastive losses for CLIP pre-training: the symmetric softmax loss (InfoNCE) of the CLIP paper, an
exact chunked variant that never holds the [N, N] similarity matrix, and SigLIP's pairwise sigmoid loss.

All losses take raw or normalised features (they L2-normalise them, in float32) and the *log* of the
temperature, `logit_scale`, as the model stores it.

Distributed training. With `distributed=True` each rank passes its own B rows; features are gathered
with `clip.distributed.gather_features`, whose backward sums gradients across ranks. Each rank's loss
covers its B rows against all N = world_size * B columns and is scaled so that the mean of the ranks'
losses is the loss of one process on the concatenated batch. Backward it as it is and average
gradients across ranks (DDP does): loss and gradients then equal the single-process ones. The value to
log is `metrics["loss"]` (already averaged over ranks), not the returned per-rank loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config_io import InvalidValue, check_field_types, require
from .distributed import gather_features

# SigLIP (Zhai et al. 2023, section 3.2) starts the temperature at t' = log 10 and the bias at -10, so
# that the many negative pairs start with a small loss instead of dominating the first steps.
SIGLIP_INITIAL_LOGIT_SCALE = math.log(10)
SIGLIP_INITIAL_LOGIT_BIAS = -10.0


@dataclass
class LossConfig:
    kind: Literal["clip", "siglip"] = "clip"  # softmax InfoNCE (CLIP) or pairwise sigmoid (SigLIP)
    # CLIP only: rows per chunk of the exact chunked loss, whose extra memory is ~3 * chunk_size * N
    # floats (plus O(N * D) for features and their gradients) instead of ~5 * B * N; None computes the
    # whole [B, N] logit matrix at once. 512 keeps batch 32768 x width 512 under 0.6 GiB.
    chunk_size: int | None = None
    # The paper clips the learned temperature so logits are scaled by at most 100; the trainer clamps
    # logit_scale to log(max_logit_scale) before the first step and after every optimiser step.
    max_logit_scale: float = 100.0

    def __post_init__(self) -> None:
        check_field_types(self)
        # The trainer clamps the log-temperature to [0, log(max_logit_scale)]: below 1 that range is empty.
        # inf is allowed and means no upper limit.
        require("max_logit_scale", self.max_logit_scale, self.max_logit_scale >= 1, ">= 1 (the paper uses 100)")
        if self.chunk_size is not None:
            require("chunk_size", self.chunk_size, self.chunk_size >= 1, '>= 1 rows, or "none" for the unchunked loss')
            if self.kind != "clip":
                raise InvalidValue("chunk_size", f'applies to the CLIP loss only; set it to "none" for kind = {self.kind!r}')


def _as_unit_at_least_float32(features: torch.Tensor) -> torch.Tensor:
    # float32 even under autocast: exp() of logits up to 100 and sums over 10^5 columns need the range.
    # float64 features stay float64 (gradient checks, float64 references): float32 would be a silent downcast.
    return F.normalize(features.to(torch.promote_types(features.dtype, torch.float32)), dim=-1)


def _check_inputs(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> None:
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            "expected image and text features of one shape [batch, dim], got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    if image_features.shape[0] == 0:
        raise ValueError("the batch is empty")
    _check_scalar("logit_scale", logit_scale)


def _check_scalar(name: str, value: torch.Tensor) -> None:
    """A one-element tensor: a float was an AttributeError ("'float' object has no attribute 'numel'"), and a
    bias of the batch's length was broadcast over the columns, a different bias for each text, without a word."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a one-element tensor (a parameter), got {type(value).__name__}")
    if value.numel() != 1:
        raise ValueError(f"{name} must be a scalar, got shape {tuple(value.shape)}")


def _rank(distributed: bool, group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group) if distributed and dist.is_initialized() else 0


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Per query row i: the cross-entropy of the logits scale * queries[i] . keys[j] over the keys j, against the
    matching key `labels[i]`, and the argmax over j; computed over blocks of `chunk_size` query rows. Backward
    recomputes each block's softmax instead of saving it, so the memory beyond inputs and gradients is a few
    [chunk_size, K] blocks, never [M, K].

    Written as differences from the matching logit, ce_i = log(1 + sum_{j != label} exp(logit_ij - logit_i,label))
    and, in backward, softmax_i,label - 1 = -(sum of the row's other softmax weights): both stay precise when a row
    is matched confidently and its loss and gradients are tiny. As lse_i - logit_i,label (two rounded numbers near
    the scale, 100) they were float32's rounding there: a sign-flipped temperature gradient 100x too large, which
    Adam's normalised step turns into full-size steps."""

    @staticmethod
    def forward(ctx, queries: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor,
                chunk_size: int):
        losses = queries.new_empty(queries.shape[0])
        best = torch.empty(queries.shape[0], dtype=torch.long, device=queries.device)
        for start in range(0, queries.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            logits = (queries[rows] @ keys.t()).mul_(scale)  # [c, K]
            best[rows] = logits.argmax(dim=1)
            at_label = (torch.arange(logits.shape[0], device=logits.device), labels[rows])
            shifted = logits.sub_(logits[at_label][:, None])  # logit_ij - logit_i,label; 0 at the label
            shifted[at_label] = float("-inf")  # the other columns only
            losses[rows] = F.softplus(torch.logsumexp(shifted, dim=1))  # log(1 + sum of the others' exp)
        ctx.save_for_backward(queries, keys, labels, scale, losses)
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(best)
        return losses, best

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor, _grad_best: torch.Tensor | None):
        queries, keys, labels, scale, losses = ctx.saved_tensors
        need_queries, need_keys, _, need_scale = ctx.needs_input_grad[:4]
        grad_queries = torch.zeros_like(queries) if need_queries else None
        grad_keys = torch.zeros_like(keys) if need_keys else None
        grad_scale = torch.zeros_like(scale) if need_scale else None
        for start in range(0, queries.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            dots = queries[rows] @ keys.t()  # [c, K] cosine similarities
            at_label = (torch.arange(dots.shape[0], device=dots.device), labels[rows])
            # d ce_i / d logit_ij = softmax_ij - [j = label]: the other columns' softmax, exp(logit_ij - lse_i)
            # with lse_i = logit_i,label + ce_i, and at the label minus their sum
            weights = (dots * scale).sub_((dots[at_label] * scale + losses[rows])[:, None]).exp_()
            weights[at_label] = 0.0
            weights[at_label] = -weights.sum(dim=1)
            weights.mul_(grad_losses[rows, None])  # [c, K]
            if need_queries:
                grad_queries[rows] = weights @ keys  # [c, D]
            if need_keys:
                grad_keys.addmm_(weights.t(), queries[rows])  # [K, D]
            if need_scale:  # logit_ij = scale * dots_ij. Last, in place: the weights are not needed after. A sum,
                # not torch.dot: the dot's float32 accumulation over c * K terms was 80x less precise (7e-6 against
                # 9e-8 of the float64 value at batch 4096)
                grad_scale += weights.mul_(dots).sum()
        # d logit / d query = scale * key (and symmetrically), applied once instead of per block.
        if need_queries:
            grad_queries.mul_(scale)
        if need_keys:
            grad_keys.mul_(scale)
        return grad_queries, grad_keys, None, grad_scale, None


def _clip_loss_terms(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    chunk_size: int | None,
    distributed: bool,
    group: dist.ProcessGroup | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(this rank's loss, image->text hits [B], text->image hits [B])."""
    _check_inputs(image_features, text_features, logit_scale)
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive number of rows or None, got {chunk_size}")
    # Autocast off: the logits and their exp() stay float32 (see _as_unit_at_least_float32).
    with torch.autocast(image_features.device.type, enabled=False):
        images = _as_unit_at_least_float32(image_features)  # [B, D]
        texts = _as_unit_at_least_float32(text_features)  # [B, D]
        all_images = gather_features(images, group) if distributed else images  # [N, D]
        all_texts = gather_features(texts, group) if distributed else texts  # [N, D]
        batch = images.shape[0]
        # Row i of this rank is row rank*B + i of the global batch; its matching pair sits in that column.
        labels = torch.arange(batch, device=images.device) + _rank(distributed, group) * batch
        scale = logit_scale.to(images.dtype).exp()

        if chunk_size is None:
            logits_per_image = scale * (images @ all_texts.t())  # [B, N]
            # One process holds the whole square matrix, whose transpose is the text->image direction.
            logits_per_text = scale * (texts @ all_images.t()) if distributed else logits_per_image.t()  # [B, N]
            loss_image = F.cross_entropy(logits_per_image, labels)
            loss_text = F.cross_entropy(logits_per_text, labels)
            best_image, best_text = logits_per_image.argmax(dim=1), logits_per_text.argmax(dim=1)
        else:
            losses_image, best_image = _ChunkedCrossEntropy.apply(images, all_texts, labels, scale, chunk_size)
            losses_text, best_text = _ChunkedCrossEntropy.apply(texts, all_images, labels, scale, chunk_size)
            loss_image, loss_text = losses_image.mean(), losses_text.mean()
        loss = (loss_image + loss_text) / 2
        return loss, best_image == labels, best_text == labels


def contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    chunk_size: int | None = None,
    distributed: bool = False,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE: mean of the image->text and text->image cross-entropies over the
    logits exp(logit_scale) * cos(image_i, text_j). image_features, text_features: [B, D], row i of one
    matching row i of the other. chunk_size: compute it exactly in blocks of that many rows (see
    LossConfig). distributed: B is this rank's share; returns this rank's part of the loss (module doc)."""
    loss, _, _ = _clip_loss_terms(image_features, text_features, logit_scale, chunk_size, distributed, group)
    return loss


def _sigmoid_loss_terms(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    distributed: bool,
    group: dist.ProcessGroup | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's loss, image->text hits [B])."""
    _check_inputs(image_features, text_features, logit_scale)
    _check_scalar("logit_bias", logit_bias)  # SigLIP's learned bias (SIGLIP_INITIAL_LOGIT_BIAS to start)
    with torch.autocast(image_features.device.type, enabled=False):
        images = _as_unit_at_least_float32(image_features)  # [B, D]
        # Every pair (i, j) is its own binary problem, so rows split across ranks without any coupling:
        # each rank scores its images against all texts and the ranks' rows together cover the N x N pairs.
        texts = _as_unit_at_least_float32(text_features)  # [B, D]
        all_texts = gather_features(texts, group) if distributed else texts  # [N, D]
        batch = images.shape[0]
        offset = _rank(distributed, group) * batch
        logits = logit_scale.to(images.dtype).exp() * (images @ all_texts.t()) + logit_bias.to(images.dtype)  # [B, N]
        signs = torch.full_like(logits, -1.0)
        signs.diagonal(offset=offset).fill_(1.0)  # pair (i, offset + i) matches
        # SigLIP normalises the sum over all N^2 pairs by N; per rank that is the sum over B rows divided by
        # B, because averaging the W ranks' losses divides by W once more.
        loss = -F.logsigmoid(signs * logits).sum() / batch
        hits = logits.argmax(dim=1) == torch.arange(batch, device=logits.device) + offset
        return loss, hits


def sigmoid_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    distributed: bool = False,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """SigLIP: -1/N * sum over all pairs of log sigmoid(z_ij * (exp(logit_scale) * cos_ij + logit_bias)),
    z_ij = 1 for matching pairs and -1 otherwise. Initialise logit_scale and logit_bias with
    SIGLIP_INITIAL_LOGIT_SCALE and SIGLIP_INITIAL_LOGIT_BIAS."""
    loss, _ = _sigmoid_loss_terms(image_features, text_features, logit_scale, logit_bias, distributed, group)
    return loss


class ContrastiveLoss(nn.Module):
    """The loss the training loop calls: `loss, metrics = loss_fn(image_features, text_features,
    logit_scale, logit_bias=None)`. `loss` is this rank's share, to backward; `metrics` holds detached
    scalars averaged over ranks: loss, image_to_text_accuracy, text_to_image_accuracy (CLIP only),
    logit_scale_exp (the multiplier exp(logit_scale)) and logit_bias (SigLIP only). Reading them with
    .item() synchronises with the device, so do it only when logging."""

    def __init__(
        self,
        kind: Literal["clip", "siglip"] = "clip",
        chunk_size: int | None = None,
        distributed: bool = False,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        if kind not in ("clip", "siglip"):
            raise ValueError(f"unknown loss kind {kind!r}; expected 'clip' or 'siglip'")
        if kind == "siglip" and chunk_size is not None:
            raise ValueError("chunk_size applies to the CLIP loss only; SigLIP's loss has no row-wise softmax")
        if chunk_size is not None and chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive number of rows or None, got {chunk_size}")
        self.kind = kind
        self.chunk_size = chunk_size
        self.distributed = distributed
        self.group = group

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.kind == "clip":
            loss, image_hits, text_hits = _clip_loss_terms(
                image_features, text_features, logit_scale, self.chunk_size, self.distributed, self.group
            )
            averaged = {
                "loss": loss.detach(),
                "image_to_text_accuracy": image_hits.float().mean(),
                "text_to_image_accuracy": text_hits.float().mean(),
            }
        else:
            if logit_bias is None:
                raise ValueError("the SigLIP loss needs logit_bias (initialise it to SIGLIP_INITIAL_LOGIT_BIAS)")
            loss, image_hits = _sigmoid_loss_terms(
                image_features, text_features, logit_scale, logit_bias, self.distributed, self.group
            )
            averaged = {"loss": loss.detach(), "image_to_text_accuracy": image_hits.float().mean()}
        metrics = self._average_over_ranks(averaged)
        metrics["logit_scale_exp"] = logit_scale.detach().float().exp()
        if self.kind == "siglip":
            metrics["logit_bias"] = logit_bias.detach().float()
        return loss, metrics

    def _average_over_ranks(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not (self.distributed and dist.is_initialized()):
            return values
        stacked = torch.stack(list(values.values()))  # one collective for all metrics
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=self.group)
        stacked /= dist.get_world_size(self.group)
        return dict(zip(values, stacked.unbind(0)))


def build_loss(config: LossConfig, distributed: bool = False, group: dist.ProcessGroup | None = None) -> ContrastiveLoss:
    """distributed: pass `DistributedInfo.is_distributed`."""
    return ContrastiveLoss(kind=config.kind, chunk_size=config.chunk_size, distributed=distributed, group=group)


def _scale_gradient(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """The same value, whose gradient is multiplied by `factor` on the way back."""
    return tensor.detach() + (tensor - tensor.detach()) * factor


def contrastive_loss_with_cached_features(
    loss_fn: ContrastiveLoss,
    cached_image_features: torch.Tensor,
    cached_text_features: torch.Tensor,
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    micro_batch_index: int,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Gradient accumulation that keeps the full batch's negatives (the "cached features" recipe).

    The loop splits this rank's batch into k micro-batches of b rows each and:
      1. under torch.no_grad(), encodes all k micro-batches -> cached_image_features, cached_text_features
         [k*b, D] (same model state, no dropout: they must equal what step 2 recomputes);
      2. for i in 0..k-1: encodes micro-batch i WITH grad -> image_features, text_features [b, D], calls
         this function with micro_batch_index=i, and backwards the returned loss (under DDP, in
         model.no_sync() for all but the last i);
      3. steps the optimizer once.

    Why the k backward passes sum to the full-batch gradient: the loss L(f_1, ..., f_k) of the full batch
    has dL/dtheta = sum_i dL/df_i * df_i/dtheta. Pass i splices the live f_i into rows [i*b, (i+1)*b)
    of the cached (detached) matrix, so its backward yields exactly the i-th term; summing the passes
    gives the whole. logit_scale and logit_bias enter every pass directly, so their gradient would be
    counted k times: this function scales it by 1/k on the way back (the value is unchanged).

    The returned loss and metrics are those of the full batch (identical in every pass); log one of them.
    In distributed training each rank passes its own k*b rows; gathering and DDP averaging apply as usual.
    """
    rows, micro_rows = cached_image_features.shape[0], image_features.shape[0]
    if cached_text_features.shape[0] != rows or text_features.shape[0] != micro_rows:
        raise ValueError("image and text features must have the same number of rows")
    if micro_rows == 0 or rows % micro_rows != 0:
        raise ValueError(f"the cached batch ({rows} rows) must split into equal micro-batches of {micro_rows} rows")
    num_micro_batches = rows // micro_rows
    if not 0 <= micro_batch_index < num_micro_batches:
        raise ValueError(f"micro_batch_index {micro_batch_index} is outside 0..{num_micro_batches - 1}")
    start, stop = micro_batch_index * micro_rows, (micro_batch_index + 1) * micro_rows

    def splice(cached: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
        cached = cached.detach()
        return torch.cat([cached[:start], live.to(cached.dtype), cached[stop:]])  # [k*b, D]

    logit_scale = _scale_gradient(logit_scale, 1 / num_micro_batches)
    if logit_bias is not None:
        logit_bias = _scale_gradient(logit_bias, 1 / num_micro_batches)
    return loss_fn(
        splice(cached_image_features, image_features),
        splice(cached_text_features, text_features),
        logit_scale,
        logit_bias,
    )
