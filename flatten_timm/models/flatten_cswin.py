""" FLatten-CSWin: CSWin Transformer with focused linear attention

Papers:
* `FLatten Transformer: Vision Transformer using Focused Linear Attention` - https://arxiv.org/abs/2308.00442
* `CSWin Transformer: A General Vision Transformer Backbone with Cross-Shaped Windows` - https://arxiv.org/abs/2107.00652

Official code: https://github.com/LeapLabTHU/FLatten-Transformer
Outputs equal the official models; official checkpoints convert on load (`checkpoint_filter_fn`).
Focused linear ('L') blocks attend over the whole feature map (the released split sizes equal the
map), adding CSWin's LePE; softmax ('S') blocks are CSWin's cross-shaped stripe attention, padded
and cropped so that any input size works.
"""
from typing import Dict, List, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, register_notrace_module, to_2tuple, use_fused_attn
from timm.models import generate_default_cfgs, register_model

from flatten_timm.layers import (
    ConvEmbed, FocusedLinearAttention, Linear, Mlp, pad_nhwc, partition_windows, softmax_attention, windows_as_map)
from flatten_timm.layers.parameter_cache import ParameterCache
from flatten_timm.layers.symbolic_shapes import is_symbolic, may_pad, size_min, tile_count
from ._base import FlattenModel, build_flatten_model, init_weights, pyramid_stages, resolve_stage_args
from ._convert import fit_state_dict_to_model, rename_keys, unwrap_state_dict
from ._pretrained import default_cfg, official_cfg

__all__ = ['FlattenCSWin']

Size = Tuple[int, int]


def _lepe_conv(dim: int, **dd) -> nn.Conv2d:
    """CSWin's locally-enhanced positional encoding: a depthwise 3x3 conv of V."""
    return nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, **dd)


class LePEFocusedLinearAttention(FocusedLinearAttention):
    """ Focused linear attention over the whole map, plus CSWin's LePE of V before the output projection."""

    def __init__(self, dim: int, num_heads: int, grid_size: Size, device=None, dtype=None, **kwargs):
        super().__init__(dim, num_heads, grid_size=grid_size, device=device, dtype=dtype, **kwargs)
        self.lepe = _lepe_conv(dim, device=device, dtype=dtype)

    def local_mixing_kernel(self):
        # dwc(v) + lepe(v) = one depthwise conv with the sum of the kernels, both centred ('same' padding)
        weight, bias, padding = super().local_mixing_kernel()
        lepe_padding = self.lepe.padding[0]
        size = max(padding, lepe_padding)
        weight = F.pad(weight, [size - padding] * 4) + F.pad(self.lepe.weight, [size - lepe_padding] * 4)
        bias = self.lepe.bias if bias is None else bias + self.lepe.bias
        # sizes from Python ints: the TorchScript-based ONNX exporter cannot infer them through Pad
        return weight.reshape(self.dim, 1, 2 * size + 1, 2 * size + 1), bias, size


@register_notrace_module  # shape-dependent control flow (grids, windows, padding): a leaf for torch.fx
class CrossStripeAttention(nn.Module):
    """ CSWin's cross-shaped window attention with LePE.

    With two branches, half the channels/heads attend within vertical stripes (full height,
    `split_size` wide) and half within horizontal ones; with one branch, all heads attend over the
    whole map. LePE is computed within each stripe.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            split_size: int,
            num_branches: int = 2,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if num_branches not in (1, 2):
            raise ValueError(f'num_branches must be 1 or 2, got {num_branches}')
        self.num_heads = num_heads
        self.split_size = split_size
        self.num_branches = num_branches
        self.fused_attn = use_fused_attn()
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.lepe = nn.ModuleList([_lepe_conv(dim // num_branches, **dd) for _ in range(num_branches)])
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self._stacked_lepe = ParameterCache(max_entries=2)  # by dtype: float32, and an autocast dtype

    def _apply(self, fn, *args, **kwargs):
        self._stacked_lepe.clear()  # a move frees storages whose addresses the next ones may reuse
        return super()._apply(fn, *args, **kwargs)

    def stripes(self, branch: int, feat_size: Size) -> Tuple[Size, Size]:
        """Stripe count and stripe size of a branch: the full map, or full height (width) by split_size,
        narrower where the map is (symbolic while exporting)."""
        H, W = feat_size
        if self.num_branches == 1:
            return (1, 1), (H, W)
        if branch == 0:
            return (1, tile_count(W, self.split_size)), (H, size_min(self.split_size, W))
        return (tile_count(H, self.split_size), 1), (size_min(self.split_size, H), W)

    def _attend(self, q, k, v, v_at_queries, lepe: nn.Module, num_heads: int) -> torch.Tensor:
        """Softmax attention of (B', h, w, C) query windows over (B', h', w', C) key/value windows, plus the LePE
        of the values at the queries' places; returns (B', h, w, C)."""
        Bw, h, w, C = q.shape
        d = C // num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(Bw, -1, num_heads, d).transpose(1, 2)

        x = softmax_attention(heads(q), heads(k), heads(v), dropout_p=self.attn_drop.p if self.training else 0.,
                              fused=self.fused_attn)
        # the conv of a channels_last window returns one: back in (B', h, w, C) order without a copy, and the
        # sum with the heads' output lands in that order too
        local = lepe(v_at_queries.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(Bw, h * w, num_heads, d)
        return (local + x.transpose(1, 2)).reshape(Bw, h, w, C)

    def _whole_stripes(self, qkv, counts: Size, stripe: Size, lepe: nn.Module, num_heads: int) -> torch.Tensor:
        """Attention within the stripes of a (B, H, W, 3, C) map of q, k and v that is a whole number of stripes;
        returns the (B, H, W, C) result as the (B, H, counts[1], stripe[1], C) view of its stripes."""
        # q, k and v partitioned together: at most one copy (none for stripes of whole rows)
        q, k, v = partition_windows(qkv, counts, stripe).unbind(3)
        return windows_as_map(self._attend(q, k, v, v, lepe, num_heads), qkv.shape[0], counts, stripe)

    def _branch(self, qkv, counts: Size, stripe: Size, lepe: nn.Module, num_heads: int) -> torch.Tensor:
        """Attention within stripes of a (B, H, W, 3, C) map of q, k and v; returns the (B, H, W, C) result, or the
        (B, H, W', w, C) view of its stripes (see `_whole_stripes`).

        A map that is not a whole number of stripes is zero-padded to one: the padded keys and values take part
        in the last stripe's softmax, the padded queries are cropped (LePE, a conv within each stripe, sees zeros
        beyond the map either way).
        """
        if is_symbolic():
            return self._branch_in_graph(qkv, counts, stripe, lepe, num_heads)
        B, H, W = qkv.shape[:3]
        pad_h, pad_w = counts[0] * stripe[0] - H, counts[1] * stripe[1] - W
        if not (pad_h or pad_w):
            return self._whole_stripes(qkv, counts, stripe, lepe, num_heads)
        # stripes span the other axis whole, so only the last stripe is partial: its real queries attend alone,
        # over its keys and values padded as above, and the padded queries are never computed
        axis, width, pad = (1, stripe[0], pad_h) if pad_h else (2, stripe[1], pad_w)
        whole = qkv.shape[axis] + pad - width
        whole_counts = (counts[0] - 1, 1) if pad_h else (1, counts[1] - 1)
        out = self._whole_stripes(qkv.narrow(axis, 0, whole), whole_counts, stripe, lepe, num_heads).flatten(2, 3)
        q_last, k_last, v_last = qkv.narrow(axis, whole, width - pad).unbind(3)
        last = self._attend(q_last, pad_nhwc(k_last, pad_h, pad_w), pad_nhwc(v_last, pad_h, pad_w), v_last, lepe,
                            num_heads)
        return torch.cat([out, last], dim=axis)

    def _branch_in_graph(self, qkv, counts: Size, stripe: Size, lepe: nn.Module, num_heads: int) -> torch.Tensor:
        """`_branch` where sizes may be symbols (export, torch.compile): the map padded to whole stripes in the
        graph, at every size, and the result cropped."""
        H, W = qkv.shape[1:3]
        pad_h, pad_w = counts[0] * stripe[0] - H, counts[1] * stripe[1] - W
        padded = F.pad(qkv, (0, 0, 0, 0, 0, pad_w, 0, pad_h)) if may_pad(pad_h, pad_w) else qkv
        return self._whole_stripes(padded, counts, stripe, lepe, num_heads).flatten(2, 3)[:, :H, :W]

    def _fits_square_stripes(self, feat_size: Size) -> bool:
        """Whether `_square_stripes` serves a map: two branches, a square map of two or more whole stripes (sizes
        that are not symbols)."""
        H, W = feat_size
        return (self.num_branches == 2 and not is_symbolic() and H == W and H > self.split_size
                and H % self.split_size == 0)

    def _square_stripes(self, qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
        """Both branches over a square (B, H, H, 3, 2, C') map of q, k and v that is a whole number of stripes;
        returns the (B, H, H, C) result.

        A vertical stripe and a transposed horizontal one then have the same shape: one attention over
        both, with the heads of both, and one LePE conv with both kernels (the horizontal one transposed; a 3x3
        conv with zero padding commutes with transposing its window). Attention does not depend on the order of
        its tokens, so the results equal the branches' own.
        """
        B, H, W, _, _, c = qkv.shape
        s = self.split_size
        n, d = H // s, c // num_heads
        # window j: the vertical stripe of columns j*s..j*s+s (H x s), the horizontal stripe of rows j*s..j*s+s
        # transposed (W x s): one copy of the map's q, k and v in the windows' order
        vertical = qkv[..., 0, :].unflatten(2, (n, s)).transpose(1, 2)
        horizontal = qkv[..., 1, :].unflatten(1, (n, s)).permute(0, 1, 3, 2, 4, 5)
        windows = torch.stack([vertical, horizontal], dim=-2).reshape(B * n, H * s, 3, 2 * num_heads, d)
        q, k, v = windows.unbind(2)
        x = softmax_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                              dropout_p=self.attn_drop.p if self.training else 0., fused=self.fused_attn)
        # both LePE kernels in v's dtype, kept for inference (in half precision, no casts per call)
        weight, bias = self._stacked_lepe.get(
            v.dtype, self.lepe.parameters(),
            lambda: (torch.cat([self.lepe[0].weight, self.lepe[1].weight.transpose(-1, -2)]).to(v.dtype),
                     torch.cat([self.lepe[0].bias, self.lepe[1].bias]).to(v.dtype)))
        local = F.conv2d(v.reshape(B * n, H, s, 2 * c).permute(0, 3, 1, 2), weight, bias, padding=1, groups=2 * c)
        # channels_last conv output: (B', L, 2h, d) as a view, and the sum lands in that order
        out = (local.permute(0, 2, 3, 1).reshape(B * n, H * s, 2 * num_heads, d) + x.transpose(1, 2))
        out = out.reshape(B, n, H, s, 2, c)
        # back to the map in one copy: vertical (B, j, row, col in stripe) and horizontal (B, j, col, row in stripe)
        vertical = out[..., 0, :].unflatten(2, (n, s)).permute(0, 2, 3, 1, 4, 5)
        horizontal = out[..., 1, :].unflatten(2, (n, s)).permute(0, 1, 4, 2, 3, 5)
        return torch.stack([vertical, horizontal], dim=-2).reshape(B, H, W, 2 * c)

    @staticmethod
    def _join_branches(maps: List[torch.Tensor]) -> torch.Tensor:
        """The branches' results side by side in channels, from `_branch`'s maps or views of their stripes."""
        if len(maps) == 1:
            return maps[0]
        # the other branch's map viewed in the layout of the first's: the concatenation reorders the vertical
        # stripes into the map in the same pass
        return torch.cat([maps[0], maps[1].reshape(maps[0].shape[:-1] + maps[1].shape[-1:])], dim=-1)

    def forward(self, x: torch.Tensor, feat_size: Size) -> torch.Tensor:
        B, N, C = x.shape
        H, W = feat_size
        heads = self.num_heads // self.num_branches
        # (B, H, W, 3, branch, C / branches): each branch's q, k and v, as views
        qkv = self.qkv(x).reshape(B, H, W, 3, self.num_branches, C // self.num_branches)
        if self._fits_square_stripes(feat_size):
            x = self._square_stripes(qkv, heads)
        else:
            x = self._join_branches([self._branch(qkv[..., b, :], *self.stripes(b, feat_size), self.lepe[b], heads)
                                     for b in range(self.num_branches)])
        return self.proj_drop(self.proj(x.reshape(B, N, C)))


class FlattenCSWinBlock(nn.Module):
    """ Pre-norm CSWin block with focused linear ('L') or cross-stripe softmax ('S') attention."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            grid_size: Size,
            split_size: int,
            last_stage: bool = False,
            attn_type: str = 'L',
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            focusing_factor: float = 3,
            kernel_size: int = 5,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            norm_layer=nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.norm1 = norm_layer(dim, **dd)
        if attn_type == 'L':
            self.attn = LePEFocusedLinearAttention(
                dim, num_heads, grid_size=grid_size, qkv_bias=qkv_bias, focusing_factor=focusing_factor,
                kernel_size=kernel_size, proj_drop=proj_drop, **dd)
        elif attn_type == 'S':
            # a stripe as wide as the map (or the last stage) is one branch over the whole map
            one_branch = last_stage or max(grid_size) <= split_size
            self.attn = CrossStripeAttention(
                dim, num_heads, split_size=split_size, num_branches=1 if one_branch else 2, qkv_bias=qkv_bias,
                attn_drop=attn_drop, proj_drop=proj_drop, **dd)
        else:
            raise ValueError(f"attn_type must be 'L' (focused linear) or 'S' (softmax), got {attn_type!r}")
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor, feat_size: Size) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), feat_size))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class FlattenCSWin(FlattenModel):
    """ FLatten-CSWin Transformer.

    Args:
        img_size: training resolution; sizes the key positional encodings.
        split_size: per stage, the stripe width of the softmax ('S') blocks.
        attn_type: per stage, 'L' focused linear (whole map) or 'S' cross-stripe softmax attention.
        focusing_factor, kernel_size: of the focused linear attention.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 64,
            depths: Sequence[int] = (2, 4, 18, 1),
            num_heads: Sequence[int] = (2, 4, 8, 16),
            split_size: Sequence[int] = (1, 2, 7, 7),
            attn_type: str = 'LLSS',
            mlp_ratios: Union[float, Sequence[float]] = 4.,
            qkv_bias: bool = True,
            focusing_factor: float = 3,
            kernel_size: int = 5,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer=nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        num_stages = len(depths)
        num_heads = resolve_stage_args('num_heads', num_heads, num_stages)
        split_size = resolve_stage_args('split_size', split_size, num_stages)
        attn_type = resolve_stage_args('attn_type', attn_type, num_stages)
        mlp_ratios = resolve_stage_args('mlp_ratios', mlp_ratios, num_stages)
        img_size = to_2tuple(img_size)
        self._init_common(in_chans, num_classes, global_pool)
        embed_dims = [embed_dim * 2 ** i for i in range(num_stages)]

        self.patch_embed = ConvEmbed(
            in_chans, embed_dim, kernel_size=7, stride=4, padding=2, pad_to_stride=True, **dd)

        stages = pyramid_stages(
            FlattenCSWinBlock,
            embed_dims,
            depths,
            img_size,
            drop_path_rate,
            downsample_fn=lambda in_dim, out_dim: ConvEmbed(
                in_dim, out_dim, kernel_size=3, stride=2, padding=1, **dd),
            stage_args=dict(
                num_heads=num_heads,
                split_size=split_size,
                last_stage=[i == num_stages - 1 for i in range(num_stages)],
                attn_type=attn_type,
                mlp_ratio=mlp_ratios,
            ),
            norm_layer=norm_layer,
            qkv_bias=qkv_bias,
            focusing_factor=focusing_factor,
            kernel_size=kernel_size,
            proj_drop=proj_drop_rate,
            attn_drop=attn_drop_rate,
            **dd,
        )
        self._init_stages(stages, embed_dims)

        self.norm = LayerNorm2d(embed_dims[-1], eps=1e-5, **dd)
        self._init_head(embed_dims[-1], drop_rate, **dd)
        self.apply(init_weights)

    @torch.jit.ignore
    def no_weight_decay(self):
        return set()

    def checkpoint_filter(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return checkpoint_filter_fn(state_dict, self)


def checkpoint_filter_fn(state_dict, model: FlattenCSWin):
    """ Official FLatten-CSWin checkpoint (bare or under 'model') -> this layout, resized to the model.

    Officially each block holds qkv/proj and its branches under `attns.{b}`; here the attention
    module holds all of them, a focused linear block's LePE as `attn.lepe`, a stripe block's as
    `attn.lepe.{b}`.
    """
    state_dict = unwrap_state_dict(state_dict)
    if 'stage1_conv_embed.0.weight' not in state_dict:
        return fit_state_dict_to_model(state_dict, model)
    linear_blocks = {k.split('.attns.')[0] for k in state_dict if k.endswith('.attns.0.positional_encoding')}
    renamed = {}
    for k, v in state_dict.items():
        if k.split('.attns.')[0] in linear_blocks:
            k = k.replace('.attns.0.get_v.', '.attn.lepe.').replace('.attns.0.', '.attn.')
        renamed[k] = v
    state_dict = rename_keys(renamed, [
        (r'\.attns\.(\d)\.get_v\.', r'.attn.lepe.\1.'),
        (r'^stage1_conv_embed\.0\.', 'patch_embed.proj.'),
        (r'^stage1_conv_embed\.2\.', 'patch_embed.norm.'),
        (r'^merge(\d)\.conv\.', lambda m: f'stages.{m.group(1)}.downsample.proj.'),
        (r'^merge(\d)\.norm\.', lambda m: f'stages.{m.group(1)}.downsample.norm.'),
        (r'^stage(\d)\.(\d+)\.(qkv|proj)\.',
         lambda m: f'stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}.attn.{m.group(3)}.'),
        (r'^stage(\d)\.', lambda m: f'stages.{int(m.group(1)) - 1}.blocks.'),
    ])
    return fit_state_dict_to_model(state_dict, model)


def _create_flatten_cswin(variant: str, pretrained: bool = False, **kwargs) -> FlattenCSWin:
    return build_flatten_model(
        FlattenCSWin, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


default_cfgs = generate_default_cfgs({
    'flatten_cswin_tiny_224.in1k': official_cfg('48ba765ba8b0451d9d5a', 'flatten_cswin_t.pth'),
    'flatten_cswin_small_224': default_cfg(),
    'flatten_cswin_base_224': default_cfg(),
    'flatten_cswin_base_384': default_cfg(input_size=(3, 384, 384), pool_size=(12, 12)),
})


@register_model
def flatten_cswin_tiny_224(pretrained: bool = False, **kwargs) -> FlattenCSWin:
    model_args = dict(embed_dim=64, depths=(2, 4, 18, 1), num_heads=(2, 4, 8, 16), split_size=(1, 2, 7, 7))
    return _create_flatten_cswin('flatten_cswin_tiny_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def flatten_cswin_small_224(pretrained: bool = False, **kwargs) -> FlattenCSWin:
    model_args = dict(embed_dim=64, depths=(2, 4, 32, 2), num_heads=(2, 4, 8, 16), split_size=(1, 2, 7, 7))
    return _create_flatten_cswin('flatten_cswin_small_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def flatten_cswin_base_224(pretrained: bool = False, **kwargs) -> FlattenCSWin:
    model_args = dict(embed_dim=96, depths=(3, 6, 29, 2), num_heads=(4, 8, 16, 32), split_size=(1, 2, 7, 7))
    return _create_flatten_cswin('flatten_cswin_base_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def flatten_cswin_base_384(pretrained: bool = False, **kwargs) -> FlattenCSWin:
    model_args = dict(
        img_size=384, embed_dim=96, depths=(3, 6, 29, 2), num_heads=(4, 8, 16, 32), split_size=(1, 2, 12, 12))
    return _create_flatten_cswin('flatten_cswin_base_384', pretrained=pretrained, **dict(model_args, **kwargs))
