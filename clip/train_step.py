"""One optimiser step's forward and backward passes: the module DDP wraps, and exact contrastive gradient
accumulation (cached features, replayed random numbers, BatchNorm statistics kept)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .loss import SIGLIP_INITIAL_LOGIT_BIAS, contrastive_loss_with_cached_features
from .model import CLIP


class ContrastiveModel(nn.Module):
    """What DDP wraps: CLIP plus the loss's own learnable parameters (SigLIP's bias). Its forward returns
    everything the loss needs, so every trained parameter is reached through DDP's forward."""

    def __init__(self, clip: CLIP, with_logit_bias: bool, trim_text: bool = True) -> None:
        super().__init__()
        self.clip = clip
        self.logit_bias = nn.Parameter(torch.tensor(SIGLIP_INITIAL_LOGIT_BIAS)) if with_logit_bias else None
        # False when the caller cuts each text batch itself, at a length read on the host (as the trainer does)
        self.trim_text = trim_text

    def forward(
        self,
        images: torch.Tensor,
        texts: torch.Tensor,
        image_features: torch.Tensor | None = None,
        text_features: torch.Tensor | None = None,
    ):
        """image_features / text_features: a locked tower's features of this very batch, computed already
        (gradient accumulation's caching pass): that tower is then not run again."""
        # Text first: measured on the CPU, RN50 at batch 16 peaks ~90 MB lower this way (3.28 vs 3.37 GiB
        # resident, fp32), ViT-B/32 within noise; the features and gradients are the same either way.
        if text_features is None:
            text_features = self.clip.encode_text(texts, normalize=True, trim=self.trim_text)  # NL -> N,D
        if image_features is None:
            image_features = self.clip.encode_image(images, normalize=True)  # N3HW -> N,D
        return image_features, text_features, self.clip.logit_scale, self.logit_bias


def contrastive_step(
    module, images, texts, micro_batches, loss_fn, autocast, backward, is_ddp,
    locked_image: bool = False, locked_text: bool = False,
):
    """One optimiser step's forward and backward passes; returns (loss, metrics).

    With k micro-batches the loss is still the whole batch's contrastive loss: every micro-batch's
    features are first computed without gradients and cached; then each micro-batch is recomputed with
    gradients and its rows take part in the full-batch loss with the others' cached features as constant
    negatives. Summing the k backward passes gives exactly the full batch's gradient (see
    `contrastive_loss_with_cached_features`). locked_image / locked_text: that tower is locked (`CLIP.lock`)
    and in eval mode, as the trainer keeps it: its cached features are the ones the gradient pass would
    compute, so they are reused, not recomputed.
    """
    if micro_batches == 1:
        with autocast():
            image_features, text_features, logit_scale, logit_bias = module(images, texts)
            loss, metrics = loss_fn(image_features, text_features, logit_scale, logit_bias)
        backward(loss)
        return loss.detach(), metrics

    if images.shape[0] % micro_batches or texts.shape[0] != images.shape[0]:
        # Tensor.chunk would make fewer micro-batches than asked (6 rows in 4: 3 of 2), and the last one, whose
        # backward pass DDP is let to all-reduce, would never come: the ranks' gradients never synchronised
        raise ValueError(f"{images.shape[0]} images and {texts.shape[0]} texts cannot be split into {micro_batches} "
                         f"equal micro-batches")
    image_chunks, text_chunks = images.chunk(micro_batches), texts.chunk(micro_batches)
    # Each micro-batch's gradient pass replays the random numbers its caching pass drew (patch dropout's
    # masks), so that both passes compute the same features: otherwise the cached negatives would come from
    # other masks, and the sum of the passes' gradients would not be the full batch's.
    rng_states = []
    cached = []
    device = next(module.parameters()).device  # where the model draws its random numbers
    with torch.no_grad(), autocast(), batch_norm_statistics_kept(module):
        for image_chunk, text_chunk in zip(image_chunks, text_chunks):
            rng_states.append(_rng_state(device))
            cached.append(module(image_chunk, text_chunk)[:2])
    cached_images = torch.cat([c[0] for c in cached])
    cached_texts = torch.cat([c[1] for c in cached])
    for index, (image_chunk, text_chunk) in enumerate(zip(image_chunks, text_chunks)):
        last = index == micro_batches - 1
        reused = {
            "image_features": cached[index][0] if locked_image else None,
            "text_features": cached[index][1] if locked_text else None,
        }
        # Why no_sync(): DDP would otherwise all-reduce gradients after every micro-batch.
        sync_context = contextlib.nullcontext() if last or not is_ddp else module.no_sync()
        with sync_context:
            with autocast(), _replayed_rng(rng_states[index], device):
                image_features, text_features, logit_scale, logit_bias = module(image_chunk, text_chunk, **reused)
                loss, metrics = contrastive_loss_with_cached_features(
                    loss_fn, cached_images, cached_texts, image_features, text_features, index, logit_scale, logit_bias
                )
            backward(loss)
    return loss.detach(), metrics


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda_state


@contextlib.contextmanager
def _replayed_rng(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device):
    """torch's generators (CPU, and `device`'s) set to `state` inside the block, and back as they were after."""
    cpu_state, cuda_state = state
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)
        yield


def batch_norms_updating_statistics(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of `module` whose forward pass updates their running statistics (in training
    mode, tracking them)."""
    return [
        norm for norm in module.modules()
        if isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.training and norm.track_running_stats
    ]


@contextlib.contextmanager
def batch_norm_statistics_kept(module: nn.Module):
    """BatchNorm running statistics left as they are by the block. The feature-caching pass of gradient
    accumulation runs every micro-batch once more in training mode; without this, a ResNet's running
    mean and variance would be updated twice per micro-batch (and the step counter doubled), so the
    evaluation-mode model would differ from one trained without accumulation.

    A momentum of 0 makes the update `running * 1 + batch * 0`, the running value itself; only the step
    counter is put back. Nothing is copied back over the buffers: under DDP, the first forward of the block
    overwrites them with rank 0's, and restoring a copy taken before it would undo that synchronisation."""
    norms = batch_norms_updating_statistics(module)
    saved = [(norm.momentum, norm.num_batches_tracked.clone()) for norm in norms]
    for norm in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        with torch.no_grad():
            for norm, (momentum, counter) in zip(norms, saved):
                norm.momentum = momentum
                norm.num_batches_tracked.copy_(counter)


class BatchNormSnapshot:
    """The running statistics of a module's BatchNorm layers that are in training mode, copied at the start of
    each step, so that a step skipped for being non-finite can put them back. The forward pass updates them
    before the loss exists: activations with inf or NaN (an fp16 overflow) would leave them NaN for good, and
    every later checkpoint refused as non-finite. Nothing to do for a model without BatchNorm (the ViTs). The
    buffers are the module's own tensors when this is built: built after the model is placed and loaded."""

    def __init__(self, module: nn.Module) -> None:
        norms = batch_norms_updating_statistics(module)
        statistics = [n.running_mean for n in norms] + [n.running_var for n in norms]
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for buffer in statistics + [n.num_batches_tracked for n in norms]:
            by_dtype.setdefault(buffer.dtype, []).append(buffer)
        # Per dtype (float statistics, int64 counters), the copies are views of one flat tensor: a multi-tensor
        # copy of one dtype is one kernel on CUDA (a mixed list falls back to one copy per tensor), and
        # restore_if chooses between a whole dtype's values in one torch.where
        self.groups = []
        for buffers in by_dtype.values():
            flat = torch.cat([b.detach().reshape(-1) for b in buffers])
            self.groups.append((buffers, flat, _views_like(flat, buffers)))

    def take(self) -> None:
        for buffers, _, saved in self.groups:  # no sync
            torch._foreach_copy_(saved, buffers)

    def restore(self) -> None:
        for buffers, _, saved in self.groups:
            torch._foreach_copy_(buffers, saved)

    def restore_if(self, skipped: torch.Tensor) -> None:
        """restore() decided on the device by `skipped`, a boolean scalar there: nothing is read on the host.
        By torch.where, not arithmetic on the flag: a buffer that the step made NaN must come back exactly."""
        with torch.no_grad():
            for buffers, saved_flat, _ in self.groups:
                chosen = torch.where(skipped, saved_flat, torch.cat([b.reshape(-1) for b in buffers]))
                torch._foreach_copy_(buffers, _views_like(chosen, buffers))


def _views_like(flat: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """`flat` cut into consecutive views with the shapes of `tensors`."""
    pieces = flat.split([t.numel() for t in tensors])
    return [piece.view(t.shape) for piece, t in zip(pieces, tensors)]
