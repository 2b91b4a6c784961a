""" What a focused linear attention layer attends to: its implicit attention maps, and their rank.

Linear attention never forms the N x n attention matrix, but it is there implicitly:
A_ij = phi(q_i) . phi(k_j) / sum_j' phi(q_i) . phi(k_j'). `capture_attention` records the layer's
own q and k (through a forward hook that changes nothing), and the functions here rebuild A with
the focusing function (power p), without it (p = 1), and as softmax of the same q and k.

    with capture_attention(model, model.stages[0].blocks[0].attn) as captured:
        model(image)
    maps = attention_maps(captured[0], query_index=..., head=0)
"""
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import FocusedLinearAttention, FocusedLinearAttention2d, map_to_tokens
from .layers.focused_linear_attention import focusing_map

__all__ = ['CapturedAttention', 'capture_attention', 'find_linear_attention', 'implicit_attention',
           'softmax_attention', 'attention_maps', 'attention_rank']


@dataclass
class CapturedAttention:
    """ The inputs of one focused-linear-attention call, per head.

    q: (B, heads, N, d) queries on the query grid; k: (B, heads, n, d) keys with their positional
    encoding added (as the layer uses them); scale: (heads, d) the softplus scale of the kernel.
    """
    q: torch.Tensor
    k: torch.Tensor
    scale: torch.Tensor
    focusing_factor: float
    feat_size: Tuple[int, int]
    key_size: Tuple[int, int]
    dwc_weight: torch.Tensor  # (d, 1, kh, kw) the rank-restoring depthwise kernel


def find_linear_attention(model: nn.Module, stage: Optional[int] = None, block: Optional[int] = None
                          ) -> Tuple[str, FocusedLinearAttention]:
    """ The focused linear attention layer of `stages[stage].blocks[block]` (default: the first one in the model)."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, FocusedLinearAttention)]
    if not layers:
        raise ValueError(f'{type(model).__name__} has no focused linear attention layer')
    if stage is None and block is None:
        return layers[0]
    prefix = f'stages.{stage if stage is not None else 0}.blocks.{block if block is not None else 0}.'
    for name, m in layers:
        if name.startswith(prefix):
            return name, m
    available = sorted({'.'.join(n.split('.')[:4]) for n, _ in layers})
    raise ValueError(f'{prefix[:-1]} has no focused linear attention (it is softmax or does not exist); '
                     f'layers with it: {", ".join(available)}')


@contextmanager
def capture_attention(model: nn.Module, layer: FocusedLinearAttention) -> Iterator[List[CapturedAttention]]:
    """ Record q and k of every call of `layer` while the block is active; the model's outputs are unchanged."""
    captured: List[CapturedAttention] = []
    heads = layer.num_heads

    def per_head(t: torch.Tensor) -> torch.Tensor:
        B, n, C = t.shape
        return t.reshape(B, n, heads, C // heads).transpose(1, 2).float()

    def hook(module: FocusedLinearAttention, args, kwargs, output):
        if isinstance(module, FocusedLinearAttention2d):  # (B, C, H, W) map in
            x, feat_size = map_to_tokens(args[0]), tuple(args[0].shape[-2:])
        else:  # (B, N, C) tokens and their grid size
            x, feat_size = args[0], args[1] if len(args) > 1 else kwargs['feat_size']
        with torch.no_grad():
            q, k, _, key_size = module.project(x, feat_size)
            k = k + module.key_positional_encoding(key_size).to(k.dtype)
            scale = F.softplus(module.scale).float().reshape(heads, -1)
        captured.append(CapturedAttention(
            q=per_head(q), k=per_head(k), scale=scale, focusing_factor=module.focusing_factor,
            feat_size=tuple(feat_size), key_size=tuple(key_size), dwc_weight=module.dwc.weight.detach().float()))

    handle = layer.register_forward_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def implicit_attention(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, focusing_factor: float) -> torch.Tensor:
    """ Rows of the implicit attention matrix of focused linear attention with power `focusing_factor`.

    q: (..., N, d), k: (..., n, d), scale: (d,). Returns (..., N, n), non-negative, rows summing to one.
    p = 1 gives plain ReLU linear attention.
    """
    phi_q = focusing_map(q, scale, focusing_factor)
    phi_k = focusing_map(k, scale, focusing_factor)
    scores = phi_q @ phi_k.transpose(-2, -1)
    return scores / scores.sum(dim=-1, keepdim=True)


def softmax_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Softmax attention of the same q and k, scaled by d ** -0.5."""
    return ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(dim=-1)


def attention_maps(captured: CapturedAttention, query_index: int, head: int = 0, sample: int = 0
                   ) -> Dict[str, torch.Tensor]:
    """ The attention of one query token over the key grid: 'focused', 'linear' (p = 1) and 'softmax',
    each (key_h, key_w), non-negative and summing to one."""
    q = captured.q[sample, head, query_index:query_index + 1]
    k = captured.k[sample, head]
    scale = captured.scale[head]
    maps = {
        'focused': implicit_attention(q, k, scale, captured.focusing_factor),
        'linear': implicit_attention(q, k, scale, 1.0),
        'softmax': softmax_attention(q, k),
    }
    return {name: m.reshape(captured.key_size) for name, m in maps.items()}


def depthwise_conv_matrix(captured: CapturedAttention, channel: int = 0) -> torch.Tensor:
    """ The rank-restoring depthwise conv as an N x n matrix acting on values (one channel's kernel).

    With reduced keys (n < N) the values are first stretched to N tokens, as the layer does.
    """
    N = captured.feat_size[0] * captured.feat_size[1]
    n = captured.key_size[0] * captured.key_size[1]
    basis = torch.eye(n).unsqueeze(1)  # n one-hot value sequences
    if n != N:
        basis = F.interpolate(basis, size=N, mode='linear')
    basis = basis.reshape(n, 1, *captured.feat_size)
    weight = captured.dwc_weight[channel:channel + 1]
    out = F.conv2d(basis, weight, padding=(weight.shape[-2] // 2, weight.shape[-1] // 2))
    return out.reshape(n, N).T


def attention_rank(captured: CapturedAttention, head: int = 0, sample: int = 0) -> Dict[str, int]:
    """ Rank of the focused attention matrix (N x n), without and with the depthwise conv added."""
    attn = implicit_attention(captured.q[sample, head], captured.k[sample, head], captured.scale[head],
                              captured.focusing_factor)
    with_dwc = attn + depthwise_conv_matrix(captured)
    return {
        'without_dwc': int(torch.linalg.matrix_rank(attn.double())),
        'with_dwc': int(torch.linalg.matrix_rank(with_dwc.double())),
        'head_dim': captured.q.shape[-1],
        'full': min(attn.shape),
    }
