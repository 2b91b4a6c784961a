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
from ._optional import import_matplotlib
from .layers import focusing_map

__all__ = ['LayerChoiceError', 'CapturedAttention', 'capture_attention', 'find_linear_attention', 'implicit_attention',
           'softmax_attention', 'attention_maps', 'attention_rank', 'draw_attention_figure']


class LayerChoiceError(ValueError):
    """The requested layer or query point does not exist or has no focused linear attention."""


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
        raise LayerChoiceError(f'{type(model).__name__} has no focused linear attention layer')
    if stage is None and block is None:
        return layers[0]
    prefix = f'stages.{stage if stage is not None else 0}.blocks.{block if block is not None else 0}.'
    for name, m in layers:
        if name.startswith(prefix):
            return name, m
    available = sorted({'.'.join(n.split('.')[:4]) for n, _ in layers})
    raise LayerChoiceError(f'{prefix[:-1]} has no focused linear attention (it is softmax or does not exist); '
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
    # in float64, so that rounding noise does not count as rank
    q, k, scale = (t.double() for t in (captured.q[sample, head], captured.k[sample, head], captured.scale[head]))
    attn = implicit_attention(q, k, scale, captured.focusing_factor)
    with_dwc = attn + depthwise_conv_matrix(captured).double()
    return {
        'without_dwc': int(torch.linalg.matrix_rank(attn)),
        'with_dwc': int(torch.linalg.matrix_rank(with_dwc)),
        'head_dim': captured.q.shape[-1],
        'full': min(attn.shape),
    }


PANEL_INCHES = 3.0
FIGURE_DPI = 100


def figure_size_px(num_points: int) -> Tuple[int, int]:
    """(width, height) in pixels of the figure draw_attention_figure makes for num_points queries."""
    return int(4 * PANEL_INCHES * FIGURE_DPI), int((num_points + 1) * PANEL_INCHES * FIGURE_DPI)


def draw_attention_figure(image: torch.Tensor, captured: CapturedAttention, points: List[Tuple[int, int]],
                          head: int = 0, title: str = '', output: Optional[str] = None):
    """ One row per query point: the image with the point, then the focused, p = 1 and softmax attention
    of that query overlaid on the image; a last row with the rank of the attention matrix without and
    with the depthwise conv. Returns the matplotlib figure (saved as PNG when `output` is given).

    image: (3, H, W) in [0, 1], the model's input; points: (x, y) pixels of that image.
    """
    plt = import_matplotlib(headless=output is not None)

    H, W = image.shape[-2:]
    fh, fw = captured.feat_size
    picture = image.permute(1, 2, 0).clamp(0, 1).numpy()
    width, height = figure_size_px(len(points))
    fig = plt.figure(figsize=(width / FIGURE_DPI, height / FIGURE_DPI), dpi=FIGURE_DPI)
    grid = fig.add_gridspec(len(points) + 1, 4)
    p = captured.focusing_factor
    titles = {'focused': f'focused (p = {p:g})', 'linear': 'linear (p = 1)', 'softmax': 'softmax (same q, k)'}
    titles = {k: v + ', x n' for k, v in titles.items()}
    for row, (x, y) in enumerate(points):
        if not (0 <= x < W and 0 <= y < H):
            raise LayerChoiceError(f'query point ({x}, {y}) is outside the {W}x{H} model input')
        query = min(int(y * fh / H), fh - 1) * fw + min(int(x * fw / W), fw - 1)
        maps = attention_maps(captured, query, head=head)
        ax = fig.add_subplot(grid[row, 0])
        ax.imshow(picture)
        ax.plot([x], [y], marker='x', color='red', markersize=10, mew=2)
        ax.set_title(f'query ({x}, {y})', fontsize=9)
        ax.axis('off')
        for col, (name, attn) in enumerate(maps.items(), start=1):
            ax = fig.add_subplot(grid[row, col])
            ax.imshow(picture)
            # in units of the uniform weight 1/n: 1 means "as much as average", comparable across maps
            heat = F.interpolate(attn[None, None] * attn.numel(), size=(H, W), mode='nearest')[0, 0].numpy()
            shown = ax.imshow(heat, cmap='jet', alpha=0.5, vmin=0)
            ax.plot([x], [y], marker='x', color='white', markersize=8, mew=2)
            ax.set_title(titles[name], fontsize=9)
            ax.axis('off')
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)

    rank = attention_rank(captured, head=head)
    ax = fig.add_subplot(grid[len(points), 1:3])
    bars = ax.bar(['attention', 'attention + DWC'], [rank['without_dwc'], rank['with_dwc']], color=['gray', 'tab:blue'])
    ax.bar_label(bars)
    ax.axhline(rank['full'], color='green', ls='--', label=f'full rank ({rank["full"]})')
    ax.axhline(rank['head_dim'], color='red', ls=':', label=f'head dim ({rank["head_dim"]})')
    ax.set_ylabel('rank')
    ax.set_title(f'rank of the {fh * fw} x {captured.key_size[0] * captured.key_size[1]} attention matrix', fontsize=9)
    ax.legend(fontsize=8)
    fig.suptitle(title + '\nattention weights in units of the uniform weight 1/n', fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    if output is not None:
        fig.savefig(output, dpi=FIGURE_DPI)
        plt.close(fig)
    return fig
