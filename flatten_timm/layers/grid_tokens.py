""" Tokens laid out on an H x W grid: layout changes, and resizing of learned per-position tables."""
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .parameter_cache import ParameterCache
from .symbolic_shapes import is_exporting, may_pad

__all__ = ['tokens_to_map', 'map_to_tokens', 'tokens_to_channels_last', 'channels_last_to_tokens', 'pad_nhwc',
           'partition_windows', 'merge_windows', 'windows_as_map', 'resample_grid_tokens', 'GridTableResizer']


def tokens_to_map(x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
    """(B, H*W, C) tokens -> (B, C, H, W) map in channels_last memory: a view of contiguous tokens.

    Through (B, H, W, C), not a transpose: its batch stride is H*W*C even when B is 1, so that convs
    recognise the map as channels_last (oneDNN otherwise reorders a batch of one to NCHW, 4-10x slower).
    """
    B, N, C = x.shape
    return x.reshape(B, feat_size[0], feat_size[1], C).permute(0, 3, 1, 2)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) map -> (B, H*W, C) tokens."""
    return x.flatten(2).transpose(1, 2)


def tokens_to_channels_last(x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
    """(B, H*W, C) tokens of any strides -> (B, C, H, W) map in channels_last memory, the tokens' own order.

    Copies only rows of C channels (never a transpose), and convs return channels_last maps that
    `channels_last_to_tokens` turns back into tokens for free.
    """
    B, N, C = x.shape
    return x.reshape(B, feat_size[0], feat_size[1], C).permute(0, 3, 1, 2).contiguous(
        memory_format=torch.channels_last)


def channels_last_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) map -> (B, H*W, C) tokens; a view when the map is channels_last."""
    B, C, H, W = x.shape
    return x.permute(0, 2, 3, 1).reshape(B, H * W, C)


def pad_nhwc(x: torch.Tensor, pad_h: int, pad_w: int) -> torch.Tensor:
    """Zero-pad a (B, H, W, C) map at the bottom and right; the map itself when there is nothing to pad
    (F.pad copies even then), unless the pads are symbols of a graph (see may_pad)."""
    return F.pad(x, (0, 0, 0, pad_w, 0, pad_h)) if may_pad(pad_h, pad_w) else x


def partition_windows(x: torch.Tensor, counts: Tuple[int, int], window: Tuple[int, int]) -> torch.Tensor:
    """(B, counts[0] * window[0], counts[1] * window[1], ...) map -> (B * count, window[0], window[1], ...) windows
    (any trailing dims: channels, or q/k/v and channels). A view when the windows are whole rows of the map.

    Every size is given, none divided or inferred (-1): sizes may be symbolic while exporting, and
    torch.export cannot prove such divisions exact for every input size.
    """
    B, rest = x.shape[0], x.shape[3:]
    x = x.reshape(B, counts[0], window[0], counts[1], window[1], *rest).transpose(2, 3)
    return x.reshape(B * counts[0] * counts[1], window[0], window[1], *rest)


def merge_windows(windows: torch.Tensor, batch: int, counts: Tuple[int, int], window: Tuple[int, int]) -> torch.Tensor:
    """(batch * count, window[0], window[1], C) windows -> (batch, counts[0] * window[0], counts[1] * window[1], C)."""
    return windows_as_map(windows, batch, counts, window).flatten(2, 3)


def windows_as_map(windows: torch.Tensor, batch: int, counts: Tuple[int, int], window: Tuple[int, int]
                   ) -> torch.Tensor:
    """(batch * count, window[0], window[1], C) windows as the (batch, H, counts[1], window[1], C) map they tile,
    a view: whoever consumes the map next (a concatenation, a copy) does the one reordering copy."""
    C = windows.shape[-1]
    x = windows.reshape(batch, counts[0], counts[1], window[0], window[1], C).transpose(2, 3)
    return x.flatten(1, 2)


def resample_grid_tokens(tokens: torch.Tensor, src_size: Tuple[int, int], dst_size: Tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize (1, h*w, C) tokens laid out on a src_size grid to dst_size (which may be symbolic
    while exporting: then the resize is always in the graph, an exact identity at src_size)."""
    if not is_exporting() and tuple(src_size) == tuple(dst_size):
        return tokens
    grid = tokens_to_map(tokens, src_size)
    grid = F.interpolate(grid.float(), size=tuple(dst_size), mode='bilinear', align_corners=False)
    return map_to_tokens(grid).to(tokens.dtype)


class GridTableResizer:
    """ A learned (1, h*w, C) table (positional encoding / embedding) resized to the grid in use.

    At the training grid the parameter itself is returned (bit-identical to a fixed-size model).
    Other sizes are interpolated; in inference (no grad) the result is kept per size until the
    parameter changes (a `ParameterCache`), so a detector running at a fixed size does no per-call
    allocation. Not an nn.Module: it holds no state that belongs in a state dict.
    """

    def __init__(self, grid_size: Tuple[int, int]):
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self._cache = ParameterCache()

    def __call__(self, table: nn.Parameter, size: Tuple[int, int]) -> torch.Tensor:
        if is_exporting():  # the size is a symbol of the graph: resize inside it, at every size
            return resample_grid_tokens(table, self.grid_size, size)
        size = (int(size[0]), int(size[1]))
        if size == self.grid_size:
            return table
        return self._cache.get(size, (table,), lambda: resample_grid_tokens(table, self.grid_size, size))

    def clear(self):
        """Forget the resized tables (their parameter moved to another device or dtype)."""
        self._cache.clear()
