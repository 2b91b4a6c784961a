""" Convolutional patch embedding / downsampling with a channel LayerNorm, NCHW in and out."""
import torch
import torch.nn as nn
from timm.layers import LayerNorm2d

__all__ = ['ConvEmbed']


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
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.proj = nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, padding=padding, **dd)
        self.norm = LayerNorm2d(out_chs, eps=norm_eps, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))
