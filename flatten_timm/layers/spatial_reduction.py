""" Spatial reduction of keys/values, and the softmax spatial-reduction attention of PVT.

Both the focused linear attention and PVT's softmax attention shrink the key/value token grid
before projecting it, either with a strided conv (ratio r) or, in PVTv2's "linear" mode, by
pooling to a fixed grid followed by a 1x1 conv.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import register_notrace_module, use_fused_attn

from .fused_inference import Linear
from .grid_tokens import map_to_tokens, tokens_to_map
from .softmax_attention import softmax_attention

__all__ = ['SpatialReduction', 'SpatialReductionAttention']


class SpatialReduction(nn.Module):
    """ Shrinks a token grid: strided conv by `sr_ratio`, or adaptive pool to `pool_size` + 1x1 conv.

    Followed by LayerNorm (and GELU in pooled mode), as in PVT / PVTv2.
    """

    def __init__(self, dim: int, sr_ratio: int = 1, pool_size: Optional[int] = None, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        assert sr_ratio > 1 or pool_size, 'SpatialReduction needs sr_ratio > 1 or a pool_size'
        self.sr_ratio = sr_ratio
        self.pool_size = pool_size
        self.pool = nn.AdaptiveAvgPool2d(pool_size) if pool_size else None
        kernel = 1 if pool_size else sr_ratio
        self.conv = nn.Conv2d(dim, dim, kernel_size=kernel, stride=kernel, **dd)
        self.norm = nn.LayerNorm(dim, **dd)
        self.act = nn.GELU() if pool_size else nn.Identity()

    def output_size(self, feat_size: Tuple[int, int]) -> Tuple[int, int]:
        if self.pool_size:
            return self.pool_size, self.pool_size
        return feat_size[0] // self.sr_ratio, feat_size[1] // self.sr_ratio

    def forward(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> Tuple[torch.Tensor, Tuple[int, int]]:
        x = tokens_to_map(x, feat_size)
        if self.pool is not None:
            x = self.pool(x)
        x = self.conv(x)
        out_size = (x.shape[-2], x.shape[-1])
        x = self.act(self.norm(map_to_tokens(x)))
        return x, out_size


@register_notrace_module  # shape-dependent control flow (grids, windows, padding): a leaf for torch.fx
class SpatialReductionAttention(nn.Module):
    """ PVT's softmax attention, keys/values from a spatially reduced grid (fused SDPA when enabled)."""

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            qkv_bias: bool = True,
            sr_ratio: int = 1,
            pool_size: Optional[int] = None,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if dim % num_heads:
            raise ValueError(f'dim {dim} must be divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.fused_attn = use_fused_attn()
        self.q = Linear(dim, dim, bias=qkv_bias, **dd)
        self.kv = Linear(dim, dim * 2, bias=qkv_bias, **dd)
        self.sr = SpatialReduction(dim, sr_ratio, pool_size, **dd) if sr_ratio > 1 or pool_size else None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        if self.sr is not None:
            x, _ = self.sr(x, feat_size)
        k, v = self.kv(x).reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = softmax_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0., fused=self.fused_attn)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))
