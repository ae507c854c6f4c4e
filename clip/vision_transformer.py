"""Vision Transformer image encoder as in CLIP: bias-free patch embedding, class token, pre-LN, final LN and
a linear projection of the class token."""

from __future__ import annotations

import torch
from torch import nn

from .architectures import VisionConfig
from .transformer import LayerNorm, Transformer


class VisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig, output_dim: int, activation: str) -> None:
        super().__init__()
        self.input_resolution = config.image_size
        self.output_dim = output_dim
        width = config.width
        grid = config.image_size // config.patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, config.layers, config.heads, config.mlp_ratio, activation, causal=False)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, output_dim))

    def init_parameters(self) -> None:
        scale = self.class_embedding.shape[0] ** -0.5
        nn.init.normal_(self.class_embedding, std=scale)
        nn.init.normal_(self.positional_embedding, std=scale)
        nn.init.normal_(self.proj, std=scale)
        self.transformer.init_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_unprojected(x) @ self.proj  # -> N,output_dim

    def forward_unprojected(self, x: torch.Tensor) -> torch.Tensor:
        """The class token after the final layer norm, before the projection to the embedding space: N,width."""
        x = self.conv1(x)  # N3HW -> N,width,grid,grid
        x = x.flatten(2).transpose(1, 2)  # -> N,grid*grid,width
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # -> N,1+grid*grid,width
        x = self.ln_pre(x)
        x = self.transformer(x.transpose(0, 1)).transpose(0, 1)  # the blocks take OpenAI's LND layout; views
        return self.ln_post(x[:, 0, :])  # the class token -> N,width
