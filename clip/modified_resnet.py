"""OpenAI's ModifiedResNet image encoder.

Differences from torchvision's ResNet, all from the CLIP paper: a stem of three 3x3 convolutions with an
average pool instead of one 7x7 convolution with a max pool; anti-aliased strided convolutions (an average
pool does the stride, the convolution runs at stride 1); and attention pooling instead of global average
pooling at the end.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .architectures import (
    VisionConfig,
    check_image_batch,
    constructor_arguments,
    wrong_image_size,
)
from .batch_norm_relu import (
    BatchNormReplay,
    ResidualReluRecipe,
    batch_norm_relu_into,
    can_call_forward_directly,
    can_rebuild_activations,
    is_plain_relu,
    is_replayable,
    saved_as_recipe,
)
from .transformer import refuse_scripting, renamed_argument


class Bottleneck(nn.Module):
    """A residual block of 1x1, 3x3, 1x1 convolutions, `planes * 4` channels out; openai/CLIP's call
    `Bottleneck(inplanes, planes, stride=1)` works as well."""

    __prepare_scriptable__ = refuse_scripting

    expansion = 4

    def __init__(
        self, in_channels: int | None = None, planes: int | None = None, stride: int = 1, *,
        inplanes: int | None = None,
    ) -> None:
        super().__init__()
        in_channels = renamed_argument("in_channels", in_channels, "inplanes", inplanes)
        if planes is None:
            raise TypeError("Bottleneck() missing required argument: 'planes'")
        out_channels = planes * self.expansion
        self.stride = stride
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu3 = nn.ReLU(inplace=True)  # after the residual add
        self.downsample = None
        if stride > 1 or in_channels != out_channels:
            # Named "-1", "0", "1" so that OpenAI's `downsample.0.weight` / `downsample.1.*` keys line up. At
            # stride 1 (a stage's first block widening the channels) the pool would be an identity that copies
            # the input and keeps the copy for backward, so it is left out.
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride) if stride > 1 else nn.Identity()),
                        ("0", nn.Conv2d(in_channels, out_channels, 1, stride=1, bias=False)),
                        ("1", nn.BatchNorm2d(out_channels)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In-place ReLU and residual add: BatchNorm's backward reads its input, never its output, so
        # overwriting the output saves one feature-map-sized allocation per activation. The ReLUs are modules
        # named as OpenAI's (relu1-3), for hooks (class-activation maps). The first two ReLUs' outputs are
        # rebuilt in backward rather than kept (see batch_norm_relu; a forward hook on any of the block's
        # modules keeps them). The third's is the next block's input: called one by one, blocks keep it;
        # ModifiedResNet calls `forward_rebuilding`, which hands it on as a recipe.
        rebuild = can_rebuild_activations(self.children())
        identity = x if self.downsample is None else self.downsample(x)
        out = batch_norm_relu_into(self.conv1(x), self.bn1, self.relu1, self.conv2, rebuild)
        out = batch_norm_relu_into(out, self.bn2, self.relu2, self._pool_then_conv3, rebuild)
        out = self.bn3(out)
        out += identity
        return self.relu3(out)

    def forward_rebuilding(
        self, x: torch.Tensor, x_recipe: ResidualReluRecipe | None, output_recipe: bool,
    ) -> tuple[torch.Tensor, ResidualReluRecipe | None]:
        """`forward`, for a caller that has checked `can_call_forward_directly` on the block and its modules:
        `x_recipe` is how backward rebuilds `x` (None: `x` is kept), and with `output_recipe` the output is
        not kept either -- the caller hands its recipe (returned beside it) to the next block. No recipe
        where a BatchNorm cannot be replayed (eval mode, SyncBatchNorm): the output is kept."""
        # The same operations in the same order as `forward`, the downsample's modules called one by one
        # for its BatchNorm's input.
        with saved_as_recipe(x, x_recipe):  # the first convolution and the shortcut's pool keep x
            if self.downsample is None:
                identity, shortcut = x, x if x_recipe is None else x_recipe
            elif not (type(self.downsample) is nn.Sequential and len(self.downsample) == 3):
                identity, shortcut = self.downsample(x), None  # a shortcut put in its place: the output is kept
            else:
                pool, conv, batch_norm = self.downsample
                shortcut_bn_input = conv(pool(x))
                identity = batch_norm(shortcut_bn_input)
                shortcut = BatchNormReplay(shortcut_bn_input, batch_norm)
                if not is_replayable(batch_norm):
                    shortcut = None
            out = self.conv1(x)
        out = batch_norm_relu_into(out, self.bn1, self.relu1, self.conv2, True)
        branch = batch_norm_relu_into(out, self.bn2, self.relu2, self._pool_then_conv3, True)
        out = self.bn3(branch)
        out += identity
        # Not where the block has no graph (a frozen stage below trained ones): nothing keeps its tensors then,
        # and a recipe handed on would keep the stage's BatchNorm inputs, one per block, for its output.
        replayable = shortcut is not None and is_replayable(self.bn3) and is_plain_relu(self.relu3)
        if not (output_recipe and out.requires_grad and replayable):
            return self.relu3(out), None
        recipe = ResidualReluRecipe(BatchNormReplay(branch, self.bn3), shortcut)
        with saved_as_recipe(out, recipe, changed_in_place=1):  # the (in-place) ReLU keeps its output
            return self.relu3(out), recipe

    def _pool_then_conv3(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.avgpool(x))


# Bottleneck's own forward, which `forward_rebuilding` does the work of: one replaced on the class runs instead
_OWN_BLOCK_FORWARD = Bottleneck.forward


class AttentionPool2d(nn.Module):
    """Multi-head attention whose single query is the mean of the feature map (plus a position embedding).

    `AttentionPool2d(spatial_dim, embed_dim, heads, output_dim)`; openai/CLIP's names `spacial_dim` and
    `num_heads` work as well, and output_dim defaults to embed_dim as there. initialise: draw the position
    embedding (N(0, embed_dim**-0.5), as openai/CLIP does; the projections start from nn.Linear's
    initialisation); False leaves it `torch.empty`, for `CLIP`, whose `init_parameters` sets it."""

    __prepare_scriptable__ = refuse_scripting

    def __init__(
        self, spatial_dim: int | None = None, embed_dim: int | None = None, heads: int | None = None,
        output_dim: int | None = None, *, spacial_dim: int | None = None, num_heads: int | None = None,
        initialise: bool = True,
    ) -> None:
        super().__init__()
        spatial_dim = renamed_argument("spatial_dim", spatial_dim, "spacial_dim", spacial_dim)
        heads = renamed_argument("heads", heads, "num_heads", num_heads)
        if embed_dim is None:
            raise TypeError("AttentionPool2d() missing required argument: 'embed_dim'")
        self.num_heads = heads  # OpenAI's name
        self.positional_embedding = nn.Parameter(torch.empty(spatial_dim * spatial_dim + 1, embed_dim))
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim or embed_dim)
        if initialise:
            self.init_positional_embedding()

    def init_positional_embedding(self) -> None:
        nn.init.normal_(self.positional_embedding, std=self.c_proj.in_features**-0.5)

    def init_parameters(self) -> None:
        std = self.c_proj.in_features**-0.5
        self.init_positional_embedding()
        for linear in (self.q_proj, self.k_proj, self.v_proj, self.c_proj):
            nn.init.normal_(linear.weight, std=std)
            nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # NCHW -> N,HW,C
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # -> N,1+HW,C
        x = x + self.positional_embedding.to(x.dtype)
        head_dim = c // self.num_heads

        def split_heads(t: torch.Tensor) -> torch.Tensor:  # N,L,C -> N,heads,L,head_dim
            # L named, not -1: a view of an empty batch (N = 0) cannot infer it
            return t.view(n, t.shape[1], self.num_heads, head_dim).transpose(1, 2)

        q = split_heads(self.q_proj(x[:, :1]))
        k = split_heads(self.k_proj(x))
        v = split_heads(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v)  # N,heads,1,head_dim
        out = out.transpose(1, 2).reshape(n, c)  # -> N,C
        return self.c_proj(out)


class ModifiedResNet(nn.Module):
    """`ModifiedResNet(config, output_dim)`, or `ModifiedResNet(layers, output_dim, heads, input_resolution=224,
    width=64)` as openai/CLIP's is called (see `openai_resnet_config`). initialise: False leaves the attention
    pool's position embedding `torch.empty` (see `AttentionPool2d`), for `CLIP`, whose `init_parameters` sets
    it; every other weight starts from its module's own initialisation."""

    __prepare_scriptable__ = refuse_scripting

    def __init__(
        self, config: VisionConfig | tuple[int, int, int, int] | None = None, *arguments, initialise: bool = True,
        **keyword_arguments,
    ) -> None:
        super().__init__()
        if isinstance(config, VisionConfig):
            output_dim = constructor_arguments("ModifiedResNet", _resnet_arguments, *arguments, **keyword_arguments)
        else:  # openai/CLIP's arguments, the first (layers) maybe by name
            leading = () if config is None else (config,)
            config, output_dim = constructor_arguments(
                "ModifiedResNet", openai_resnet_config, *leading, *arguments, **keyword_arguments)
        self.input_resolution = config.image_size
        self.output_dim = output_dim
        width = config.width
        # The 3-convolution stem; its first convolution does the stride-2 downsampling.
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu1, self.relu2, self.relu3 = nn.ReLU(inplace=True), nn.ReLU(inplace=True), nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)

        self._in_channels = width
        self.layer1 = self._make_stage(width, config.layers[0], stride=1)
        self.layer2 = self._make_stage(width * 2, config.layers[1], stride=2)
        self.layer3 = self._make_stage(width * 4, config.layers[2], stride=2)
        self.layer4 = self._make_stage(width * 8, config.layers[3], stride=2)

        embed_dim = width * 32  # the final stage's channels: width * 8 planes * expansion 4
        self.attnpool = AttentionPool2d(config.image_size // 32, embed_dim, config.heads, output_dim,
                                        initialise=initialise)

    def _make_stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [Bottleneck(self._in_channels, planes, stride)]
        self._in_channels = planes * Bottleneck.expansion
        layers += [Bottleneck(self._in_channels, planes, 1) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def init_parameters(self) -> None:
        self.attnpool.init_parameters()
        # Zero-init the last BatchNorm gain of each residual branch: every block starts as the identity.
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                nn.init.zeros_(block.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image_shape = x.shape
        check_image_batch(image_shape, self.input_resolution)
        x = x.to(self.conv1.weight.dtype)  # as OpenAI's: float32 images into a half-precision model
        stem = (self.conv1, self.bn1, self.relu1, self.conv2, self.bn2, self.relu2, self.conv3, self.bn3, self.relu3,
                self.avgpool)
        rebuild = can_rebuild_activations(stem)  # see Bottleneck.forward
        x = batch_norm_relu_into(self.conv1(x), self.bn1, self.relu1, self.conv2, rebuild)  # -> N,width/2,H/2,W/2
        x = batch_norm_relu_into(x, self.bn2, self.relu2, self.conv3, rebuild)
        x = batch_norm_relu_into(x, self.bn3, self.relu3, self.avgpool, rebuild)  # -> N,width,H/4,W/4
        x = self._stages(x)  # -> N,width*32,H/32,W/32
        pool = self.attnpool
        # Checked for our own attention pool only: code that replaces it (nn.Identity() for layer4's feature map,
        # another pooling) or its forward (position embeddings resized to the image) takes what it takes, as in
        # openai/CLIP, whose forward only calls it; reading its position embeddings failed on those
        ours = type(pool) is AttentionPool2d and "forward" not in vars(pool)
        if ours and x.shape[-2] * x.shape[-1] + 1 != pool.positional_embedding.shape[0]:
            raise wrong_image_size(image_shape, self.input_resolution)
        return pool(x)  # -> N,output_dim

    def _stages(self, x: torch.Tensor) -> torch.Tensor:
        stages = (self.layer1, self.layer2, self.layer3, self.layer4)  # strides 1, 2, 2, 2: -> H/32
        # Only our own stages and blocks (a replaced or subclassed one, or one whose forward was replaced, runs its
        # own forward), called as modules wherever that would do more than run `forward`.
        ours = all(type(stage) is nn.Sequential for stage in stages) and Bottleneck.forward is _OWN_BLOCK_FORWARD
        blocks = [block for stage in stages for block in stage] if ours else []
        ours = ours and all(type(block) is Bottleneck for block in blocks)
        if not (ours and can_call_forward_directly(module for stage in stages for module in stage.modules())):
            return self.layer4(self.layer3(self.layer2(self.layer1(x))))
        # Each block's output is rebuilt in backward from the next block on (see Bottleneck.forward_rebuilding);
        # the last one's goes into the attention pool, which does not keep it, so it is left to autograd.
        recipe = None
        for index, block in enumerate(blocks):
            x, recipe = block.forward_rebuilding(x, recipe, output_recipe=index < len(blocks) - 1)
        return x


def openai_resnet_config(
    layers: tuple[int, int, int, int], output_dim: int, heads: int, input_resolution: int = 224, width: int = 64,
) -> tuple[VisionConfig, int]:
    """The tower (and its output width) that openai/CLIP's `ModifiedResNet(...)` builds from these arguments."""
    config = VisionConfig(kind="resnet", image_size=input_resolution, width=width, layers=layers, heads=heads)
    return config, output_dim


def _resnet_arguments(output_dim: int) -> int:
    """This library's arguments after the config (a function, so that Python checks the call)."""
    return output_dim
