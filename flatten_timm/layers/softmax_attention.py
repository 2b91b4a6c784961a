""" Softmax attention of the softmax ('S') stages, with the kernel chosen by window size."""
from typing import Optional

import torch
import torch.nn.functional as F

from .symbolic_shapes import is_exporting

__all__ = ['softmax_attention']

# On CPU, for windows of at most this many keys (Swin's 7x7 and 12x12), an explicit matmul-softmax-matmul
# is 1.5-2x faster than SDPA's flash kernel (measured on a 2-core x86, torch 2.14); above it SDPA wins.
_CPU_EXPLICIT_MAX_KEYS = 160


def softmax_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_bias: Optional[torch.Tensor] = None,
        dropout_p: float = 0.,
        fused: bool = True,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + attn_bias) v for (..., N, d) q and (..., n, d) k, v; dropout on the weights.

    `fused` (timm's use_fused_attn()) allows SDPA; it is used except for small windows on CPU, and in
    exported graphs, where the window size is a symbol (explicit ops run in every ONNX runtime).
    """
    if fused and not is_exporting() and not (q.device.type == 'cpu' and k.shape[-2] <= _CPU_EXPLICIT_MAX_KEYS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=dropout_p)
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if attn_bias is not None:
        attn = attn + attn_bias
    attn = attn.softmax(dim=-1)
    if dropout_p:
        attn = F.dropout(attn, dropout_p)
    return attn @ v
