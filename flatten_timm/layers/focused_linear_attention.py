""" Focused linear attention (FLatten Transformer, Han et al., ICCV 2023).

Linear attention with a ReLU kernel sharpened by a norm-preserving power ("focusing"), a learnable
per-channel scale, a learnable key positional encoding, and a depthwise conv on V that restores the
rank of the attention matrix. Keys/values may come from a spatially reduced grid (PVT).

This is the one implementation of the math that every flatten_* family uses.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .grid_tokens import GridTableResizer, map_to_tokens, tokens_to_map
from .spatial_reduction import SpatialReduction

__all__ = ['FocusedLinearAttention', 'FocusedLinearAttention2d', 'focusing_map', 'linear_attention']


def focusing_map(x: torch.Tensor, scale: torch.Tensor, focusing_factor: float) -> torch.Tensor:
    """phi_p(x): ReLU kernel, divided by a learned scale, raised to power p at unchanged L2 norm.

    Computed in float32 at least: the power overflows fp16 and loses the norm in bf16.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    x = (F.relu(x.to(dtype)) + 1e-6) / scale.to(dtype)
    x_norm = x.norm(dim=-1, keepdim=True)
    x_pow = x ** focusing_factor
    return (x_pow / x_pow.norm(dim=-1, keepdim=True)) * x_norm


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Multi-head linear attention phi(q) (phi(k)^T v) / (phi(q) . mean phi(k)).

    q: (B, N, C), k and v: (B, n, C); q and k already mapped (float32 from focusing_map), v in the
    compute dtype. Returns (B, N, C) in v's dtype, heads merged.
    """
    B, N, C = q.shape
    n = k.shape[1]
    q = q.reshape(B, N, num_heads, -1).transpose(1, 2)
    k = k.reshape(B, n, num_heads, -1).transpose(1, 2)
    v = v.reshape(B, n, num_heads, -1).transpose(1, 2)
    # the normaliser in q's precision (float32): a product and a sum, which autocast leaves alone
    z = 1 / ((q * k.mean(dim=-2, keepdim=True)).sum(dim=-1, keepdim=True) + 1e-6)
    if v.dtype in (torch.float16, torch.bfloat16):
        # a query whose ReLU is all zero maps to ~1e-6, below fp16's normal range: its per-query scale
        # cancels between numerator and normaliser, so bring it to unit norm before the cast
        q_norm = q.norm(dim=-1, keepdim=True)
        q, z = q / q_norm, z * q_norm
    # k^T v / n, each factor scaled by n**-0.5 to stay inside the fp16 range
    kv = (k.to(v.dtype).transpose(-2, -1) * (n ** -0.5)) @ (v * (n ** -0.5))
    x = ((q.to(v.dtype) @ kv) * z).to(v.dtype)
    return x.transpose(1, 2).reshape(B, N, C)


class FocusedLinearAttention(nn.Module):
    """ Focused linear attention over tokens on an H x W grid, (B, H*W, C) -> (B, H*W, C).

    Args:
        dim: channels.
        num_heads: attention heads.
        grid_size: query grid at the training resolution; sizes the key positional encoding.
        qkv_bias: bias in the q/k/v projections.
        sr_ratio: keys/values from a conv with kernel = stride = sr_ratio (PVT); 1 for none.
        pool_size: keys/values from an adaptive pool to pool_size x pool_size (PVTv2 "linear" mode).
        focusing_factor: the power p of the focusing function (3 in the released models).
        kernel_size: kernel of the rank-restoring depthwise conv on V (5 in the released models).
        proj_drop: dropout after the output projection.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            grid_size: Tuple[int, int] = (14, 14),
            qkv_bias: bool = True,
            sr_ratio: int = 1,
            pool_size: Optional[int] = None,
            focusing_factor: float = 3,
            kernel_size: int = 5,
            proj_drop: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if dim % num_heads:
            raise ValueError(f'dim {dim} must be divisible by num_heads {num_heads}')
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.focusing_factor = focusing_factor

        if sr_ratio > 1 or pool_size:
            self.qkv = None
            self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
            self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias, **dd)
            self.sr = SpatialReduction(dim, sr_ratio, pool_size, **dd)
            self.key_grid_size = self.sr.output_size(grid_size)
        else:
            # one fused projection when queries and keys see the same tokens
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
            self.q = self.kv = self.sr = None
            self.key_grid_size = tuple(grid_size)

        # one depthwise kernel shared by all heads, as in the paper
        self.dwc = nn.Conv2d(self.head_dim, self.head_dim, kernel_size, padding=kernel_size // 2,
                             groups=self.head_dim, **dd)
        self.scale = nn.Parameter(torch.zeros(1, 1, dim, **dd))
        self.positional_encoding = nn.Parameter(
            torch.zeros(1, self.key_grid_size[0] * self.key_grid_size[1], dim, **dd))
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self._resize_pe = GridTableResizer(self.key_grid_size)

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, num_heads={self.num_heads}, focusing_factor={self.focusing_factor}, '
                f'key_grid_size={self.key_grid_size}')

    def key_positional_encoding(self, key_size: Tuple[int, int]) -> torch.Tensor:
        """The key positional encoding resized to the actual key grid (cached for inference)."""
        return self._resize_pe(self.positional_encoding, key_size)

    def project(self, x: torch.Tensor, feat_size: Tuple[int, int]):
        """Project (B, H*W, C) tokens to q, k, v; returns them and the key grid size."""
        if self.qkv is not None:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            return q, k, v, feat_size
        q = self.q(x)
        x, key_size = self.sr(x, feat_size)
        k, v = self.kv(x).chunk(2, dim=-1)
        return q, k, v, key_size

    def restore_rank(self, v: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        """Depthwise conv of V on the query grid, all heads at once (the kernel repeats per head)."""
        B, n, C = v.shape
        H, W = feat_size
        v = v.transpose(1, 2)
        if n != H * W:
            # keys were reduced: stretch V back to N tokens along the flattened token axis (as released)
            v = F.interpolate(v, size=H * W, mode='linear')
        v = v.reshape(B, C, H, W)
        weight = self.dwc.weight.repeat(self.num_heads, 1, 1, 1)
        bias = self.dwc.bias.repeat(self.num_heads) if self.dwc.bias is not None else None
        out = F.conv2d(v, weight.to(v.dtype), bias.to(v.dtype) if bias is not None else None,
                       padding=self.dwc.padding, groups=C)
        return map_to_tokens(out)

    def attend(
            self,
            q: torch.Tensor,
            k: torch.Tensor,
            v: torch.Tensor,
            feat_size: Tuple[int, int],
            key_size: Tuple[int, int],
    ) -> torch.Tensor:
        """The focused linear attention of projected q (B, N, C), k, v (B, n, C), before the output projection."""
        k = k + self.key_positional_encoding(key_size).to(k.dtype)
        scale = F.softplus(self.scale)
        q = focusing_map(q, scale, self.focusing_factor)
        k = focusing_map(k, scale, self.focusing_factor)
        x = linear_attention(q, k, v, self.num_heads)
        return x + self.restore_rank(v, feat_size)

    def forward(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        q, k, v, key_size = self.project(x, feat_size)
        x = self.attend(q, k, v, feat_size, key_size)
        return self.proj_drop(self.proj(x))


class FocusedLinearAttention2d(FocusedLinearAttention):
    """ Focused linear attention on a feature map, (B, C, H, W) -> (B, C, H, W), for CNN necks.

    A drop-in attention for YOLO / RT-DETR style necks at any map size, square or not. The key
    positional encoding is a learned parameter at `grid_size` (the map size at the training
    resolution, e.g. 20 x 20 for the stride-32 map of a 640 image) and is resized to the map in use.
    The attention is FocusedLinearAttention's own; only the layout changes.

    Args:
        dim: channels of the map.
        num_heads: attention heads (dim must divide by it).
        grid_size: the map size the positional encoding is learned at.
        sr_ratio: keys/values from a strided conv of this ratio (1: none); maps must be at least this large.
        focusing_factor, kernel_size, qkv_bias, proj_drop: as FocusedLinearAttention.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            grid_size: Tuple[int, int] = (20, 20),
            sr_ratio: int = 1,
            focusing_factor: float = 3,
            kernel_size: int = 5,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            device=None,
            dtype=None,
    ):
        grid_size = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
        super().__init__(
            dim, num_heads=num_heads, grid_size=grid_size, qkv_bias=qkv_bias, sr_ratio=sr_ratio,
            focusing_factor=focusing_factor, kernel_size=kernel_size, proj_drop=proj_drop, device=device, dtype=dtype)
        self.sr_ratio = sr_ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.dim:
            raise ValueError(f'{type(self).__name__}(dim={self.dim}) expects a (B, {self.dim}, H, W) map, '
                             f'got shape {tuple(x.shape)}')
        B, C, H, W = x.shape
        if min(H, W) < self.sr_ratio:
            raise ValueError(f'a {H}x{W} map is smaller than sr_ratio={self.sr_ratio}: use a smaller sr_ratio '
                             f'for maps this small')
        out = super().forward(map_to_tokens(x), (H, W))
        return tokens_to_map(out, (H, W))
