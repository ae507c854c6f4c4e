"""Vision Transformer image encoder as in CLIP: bias-free patch embedding, class token, pre-LN, final LN and
a linear projection of the class token."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .architectures import (
    VisionConfig,
    check_image_batch,
    constructor_arguments,
    wrong_image_size,
)
from .transformer import (
    LayerNorm,
    Transformer,
    autocast_enabled_for,
    forward_replaced,
    has_hooks,
    refuse_scripting,
    runs_as_openai,
)


class VisionTransformer(nn.Module):
    """`VisionTransformer(config, output_dim, activation)`, or `VisionTransformer(input_resolution, patch_size,
    width, layers, heads, output_dim)` as openai/CLIP's is called (QuickGELU; see `openai_vision_config`).

    initialise: draw the class and position embeddings and the projection (N(0, width**-0.5), as openai/CLIP
    does); the rest starts from its modules' own initialisation. False leaves those three and the blocks'
    attention input projections as `torch.empty`, for a caller that initialises them itself: `CLIP`, whose
    `init_parameters` sets every weight and whose seeded draws stay as they were."""

    __prepare_scriptable__ = refuse_scripting

    def __init__(
        self, config: VisionConfig | int | None = None, *arguments, initialise: bool = True, **keyword_arguments,
    ) -> None:
        super().__init__()
        if isinstance(config, VisionConfig):
            output_dim, activation = constructor_arguments(
                "VisionTransformer", _vision_transformer_arguments, *arguments, **keyword_arguments)
        else:  # openai/CLIP's arguments, the first (input_resolution) maybe by name
            leading = () if config is None else (config,)
            config, output_dim = constructor_arguments(
                "VisionTransformer", openai_vision_config, *leading, *arguments, **keyword_arguments)
            activation = "quick_gelu"
        self.input_resolution = config.image_size
        self.output_dim = output_dim
        width = config.width
        grid = config.image_size // config.patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(
            width, config.layers, config.heads, mlp_ratio=config.mlp_ratio, activation=activation,
            initialise=initialise,
        )
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, output_dim))
        # Patch dropout (FLIP): in training mode, the fraction of patch tokens left out of the transformer, a
        # new random subset per image; the class token always stays. Set through CLIP.set_patch_dropout.
        self.patch_dropout = 0.0
        if initialise:
            self.init_embeddings()

    def init_embeddings(self) -> None:
        """The class and position embeddings and the projection: N(0, width**-0.5)."""
        scale = self.class_embedding.shape[0] ** -0.5
        nn.init.normal_(self.class_embedding, std=scale)
        nn.init.normal_(self.positional_embedding, std=scale)
        nn.init.normal_(self.proj, std=scale)

    def init_parameters(self) -> None:
        self.init_embeddings()
        self.transformer.init_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_unprojected(x)
        # `visual.proj = None` leaves the projection out, as in openai/CLIP (a common way to get these features)
        return x if self.proj is None else x @ self.proj  # -> N,output_dim

    def forward_unprojected(self, x: torch.Tensor) -> torch.Tensor:
        """The class token after the final layer norm, before the projection to the embedding space: N,width."""
        image_shape = x.shape
        check_image_batch(image_shape, self.input_resolution)
        x = embed_patches(self.conv1, x)  # N3HW -> N,grid*grid,width
        if x.shape[1] + 1 != self.positional_embedding.shape[0]:
            raise wrong_image_size(image_shape, self.input_resolution)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # -> N,1+grid*grid,width
        if self.training and self.patch_dropout > 0:
            x = keep_random_patches(x, self.patch_dropout)  # -> N,1+kept,width
        x = self.ln_pre(x)
        # The blocks take OpenAI's LND shape: a view of the batch-major tensor (see clip.transformer), no copy;
        # a contiguous one, as OpenAI's, for code that watches or changes them
        x = x.transpose(0, 1)
        if runs_as_openai(self.transformer):
            return self.ln_post(self.transformer(x.contiguous())[0])  # the class token -> N,width
        # Only the class token is read: the last block computes it alone
        class_token = torch.zeros(x.shape[1], dtype=torch.long, device=x.device)
        return self.ln_post(self.transformer.forward_at(x, class_token))  # -> N,width


def embed_patches(conv: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """`conv(images).flatten(2).transpose(1, 2)` (N,C,H,W -> N,patches,width) for the patch embedding, a
    convolution whose stride is its kernel size. The patches do not overlap, so in half precision (autocast, or
    half-precision images and weights) it runs as one matrix product of the [N * patches, C * p * p] patch
    rows with the flattened filters: the same sums in another order. Why: on an H200 in bf16, cuDNN ran
    ViT-B/16's 3-channel convolution at ~30 TFLOP/s (at batch 256, 1.9 ms forward and 1.2 ms for the weight
    gradient, 4% of a compiled training step), and a matrix product of these shapes is what tensor cores are
    built for: measured again on the H200, the convolution's kernels were gone from the compiled step's
    profile (docs/benchmarks.md, second GPU run). float32 keeps the convolution: there it
    keeps the caller's images for backward, where the product would keep a copy of them. So does anything
    else: a replaced, hooked or other kind of module, other strides or padding, and inputs the convolution
    would refuse (with its own error)."""
    dtype = _matrix_product_dtype(conv, images)
    if dtype is None:
        return conv(images).flatten(2).transpose(1, 2)
    # Under autocast, cast before the rearranging copy, so that copy is the half-size one
    return patch_rows_times_filters(conv, images.to(dtype))


def patch_rows_times_filters(conv: nn.Conv2d, images: torch.Tensor) -> torch.Tensor:
    """The patch convolution's output, N,patches,width, as a matrix product (see `embed_patches`)."""
    n, channels, height, width = images.shape
    patch = conv.kernel_size[0]
    rows, columns = height // patch, width // patch  # a remainder is left out, as the convolution does
    patches = images[:, :, : rows * patch, : columns * patch].reshape(n, channels, rows, patch, columns, patch)
    # -> N, rows, columns, C, p, p: each patch's values in the order of the filters' flattened weights
    patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(n, rows * columns, channels * patch * patch)
    return F.linear(patches, conv.weight.flatten(1), conv.bias)


_OWN_CONV2D_FORWARD = nn.Conv2d.forward  # as torch wrote it: a later replacement on the class counts as one
_HALF_PRECISION = (torch.float16, torch.bfloat16)


def _matrix_product_dtype(conv: nn.Module, images: torch.Tensor) -> torch.dtype | None:
    """The half-precision dtype the patch embedding runs in as a matrix product (autocast's, or the images'
    and filters' own), or None where the convolution runs."""
    plain = (
        # Hooks on conv1 itself: the caller watches it, so it runs. Global hooks (whole-program tools: FLOP
        # counters, memory trackers) see the model run as it does, as the blocks do (clip.transformer).
        type(conv) is nn.Conv2d and not forward_replaced(conv, _OWN_CONV2D_FORWARD)
        and not has_hooks(conv, count_global=False)
        and conv.kernel_size[0] == conv.kernel_size[1] and tuple(conv.stride) == tuple(conv.kernel_size)
        and tuple(conv.padding) == (0, 0) and tuple(conv.dilation) == (1, 1) and conv.groups == 1
    )
    if not plain or images.dim() != 4 or images.shape[1] != conv.in_channels or images.device != conv.weight.device:
        return None
    if min(images.shape[2:]) < conv.kernel_size[0]:
        return None  # smaller than one patch
    if autocast_enabled_for(images):
        dtype = torch.get_autocast_dtype(images.device.type)
    else:
        dtype = images.dtype if images.dtype == conv.weight.dtype else None
    return dtype if dtype in _HALF_PRECISION else None


def openai_vision_config(
    input_resolution: int, patch_size: int, width: int, layers: int, heads: int, output_dim: int,
) -> tuple[VisionConfig, int]:
    """The tower (and its output width) that openai/CLIP's `VisionTransformer(...)` builds from these arguments."""
    config = VisionConfig(kind="vit", image_size=input_resolution, patch_size=patch_size, width=width,
                          layers=layers, heads=heads)
    return config, output_dim


def _vision_transformer_arguments(output_dim: int, activation: str) -> tuple[int, str]:
    """This library's arguments after the config (a function, so that Python checks the call)."""
    return output_dim, activation


def kept_patch_count(num_patches: int, patch_dropout: float) -> int:
    return max(1, int(num_patches * (1.0 - patch_dropout)))


def keep_random_patches(x: torch.Tensor, patch_dropout: float) -> torch.Tensor:
    """x: N,1+P,width (class token first) -> N,1+K,width with K = kept_patch_count(P) patches per row, drawn
    without replacement from torch's generator on x's device (in their original order)."""
    n, length, width = x.shape
    kept = kept_patch_count(length - 1, patch_dropout)
    order = torch.rand(n, length - 1, device=x.device).argsort(dim=1)[:, :kept].sort(dim=1).values
    patches = x[:, 1:].gather(1, order.unsqueeze(-1).expand(n, kept, width))
    return torch.cat([x[:, :1], patches], dim=1)
