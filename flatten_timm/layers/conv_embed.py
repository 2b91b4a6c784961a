""" Convolutional patch embedding / downsampling with a channel LayerNorm, NCHW in and out."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d, register_notrace_module

from .symbolic_shapes import is_exporting, tile_count

__all__ = ['ConvEmbed']


@register_notrace_module  # shape-dependent control flow (grids, windows, padding): a leaf for torch.fx
class ConvEmbed(nn.Module):
    """ Conv2d(kernel, stride, padding) then LayerNorm over channels: PVTv2's overlapping patch embedding,
    CSWin's stem and merge blocks."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            kernel_size: int,
            stride: int,
            padding: int,
            norm_eps: float = 1e-5,
            pad_to_stride: bool = False,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.proj = nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, padding=padding, **dd)
        self.norm = LayerNorm2d(out_chs, eps=norm_eps, **dd)
        # zero-pad right/bottom to a multiple of the stride, so the output is ceil(size / stride)
        # whatever kernel and padding the checkpoint fixed (CSWin's stem otherwise drops a row at 4k + 1)
        self.pad_to_stride = pad_to_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad_to_stride:
            stride = self.proj.stride
            # through floor division, not %: inductor cannot yet lower a modulo of sizes that reaches a float
            pad_h = tile_count(x.shape[-2], stride[0]) * stride[0] - x.shape[-2]
            pad_w = tile_count(x.shape[-1], stride[1]) * stride[1] - x.shape[-1]
            if is_exporting() or pad_h or pad_w:
                x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.norm(self.proj(x))
