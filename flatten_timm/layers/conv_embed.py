""" Convolutional patch embeddings and downsampling: ConvEmbed (conv + channel LayerNorm, NCHW in and out) and
timm's PatchEmbed padded to whole patches in a form that dynamic-shape compiles handle well."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d, PatchEmbed as _TimmPatchEmbed, register_notrace_module

from .symbolic_shapes import may_pad, tile_padding

__all__ = ['ConvEmbed', 'PatchEmbed', 'pad_to_whole_tiles']


def pad_to_whole_tiles(x: torch.Tensor, tile) -> torch.Tensor:
    """Zero-pad a (B, C, H, W) map at the bottom and right to whole (tile[0], tile[1]) tiles; the map itself
    when it already is (unless its sizes may be symbols, see may_pad)."""
    pad_h, pad_w = tile_padding(x.shape[-2], tile[0]), tile_padding(x.shape[-1], tile[1])
    return F.pad(x, (0, pad_w, 0, pad_h)) if may_pad(pad_h, pad_w) else x


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
            x = pad_to_whole_tiles(x, self.proj.stride)
        return self.norm(self.proj(x))


@register_notrace_module  # pads by the input size: a leaf for torch.fx
class PatchEmbed(_TimmPatchEmbed):
    """ timm's PatchEmbed (same parameters and state dict), its input zero-padded at the bottom and right to
    whole patches (build it without timm's dynamic_img_pad).

    timm pads with `(patch - size % patch) % patch`. Under dynamic-shape torch.compile such modulos nest
    stage by stage into the sizes of every later tensor, and their simplification made the compile of
    FLatten-Swin take minutes; padding through floor division (tile_padding) keeps each stage's size a
    short formula.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(pad_to_whole_tiles(x, self.patch_size))
