""" FLatten-Swin: Swin Transformer with focused linear attention

Papers:
* `FLatten Transformer: Vision Transformer using Focused Linear Attention` - https://arxiv.org/abs/2308.00442
* `Swin Transformer: Hierarchical Vision Transformer using Shifted Windows` - https://arxiv.org/abs/2103.14030

Official code: https://github.com/LeapLabTHU/FLatten-Transformer
Outputs equal the official models; official checkpoints convert on load (`checkpoint_filter_fn`).
Focused linear ('L') blocks use large windows (56 at 224, so the first two stages attend globally);
softmax ('S') blocks are the usual shifted 7x7 (12x12 at 384) window attention. Windows are padded
and cropped, so any input size works.
"""
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from timm.layers import DropPath, register_notrace_module, to_2tuple, trunc_normal_, use_fused_attn
from timm.models import generate_default_cfgs, register_model
from timm.models.swin_transformer import PatchMerging as _TimmPatchMerging

from flatten_timm.layers import (
    FocusedLinearAttention, Linear, Mlp, PatchEmbed, merge_windows, pad_nhwc, partition_windows, softmax_attention)
from flatten_timm.layers.parameter_cache import LruCache
from flatten_timm.layers.symbolic_shapes import (
    fresh_size, is_exporting, is_symbolic, is_torch_exporting, roll_hw, size_gt, size_min, tile_count, tile_padding)
from ._base import (
    FlattenModel, build_flatten_model, init_weights, resolve_stage_args, stage_drop_path_rates, stage_reduction)
from ._convert import fit_state_dict_to_model, rename_keys, unwrap_state_dict
from ._pretrained import official_cfg

__all__ = ['FlattenSwin']

Size = Tuple[int, int]


def relative_position_index(window: Size, table_window: Size, device=None) -> torch.Tensor:
    """(N, N) indices into a relative position bias table made for `table_window`, for a window <= it."""
    coords = torch.stack(torch.meshgrid(
        torch.arange(window[0], device=device), torch.arange(window[1], device=device), indexing='ij')).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]
    return (rel[0] + table_window[0] - 1) * (2 * table_window[1] - 1) + (rel[1] + table_window[1] - 1)


def shifted_window_mask(counts: Size, window: Size, shift: Size, device=None) -> torch.Tensor:
    """(num_windows, N, N) additive mask that keeps a shifted window from attending across the roll seam.

    Over a map of counts x window, rows (and columns) fall in three regions: before the last window, in
    it before the seam, after the seam; tokens attend only within their region. Sizes may be symbolic
    (an exported graph builds the mask at every size; with no shift the mask is all zero).
    """
    def regions(count, w, s):
        size = count * w
        i = torch.arange(size, device=device)
        return (i >= size - w).long() + (i >= size - s).long()

    region = regions(counts[0], window[0], shift[0]).unsqueeze(1) * 3 + regions(
        counts[1], window[1], shift[1]).unsqueeze(0)
    windows = partition_windows(region.reshape(1, counts[0] * window[0], counts[1] * window[1], 1), counts, window)
    windows = windows.reshape(counts[0] * counts[1], window[0] * window[1])
    # -100 rather than -inf, as the released models were trained with it
    return (windows.unsqueeze(1) != windows.unsqueeze(2)).float() * -100.0


def _fresh_window_sizes(feat_size: Size, counts: Size, window: Size, shift: Size):
    """Under torch.export: counts, windows and shifts as fresh size symbols, with the facts the later shape
    checks need. Their min/ceil formulas would make torch.export prove bounds it cannot, and fix the size."""
    counts, window, shift = (tuple(fresh_size(v) for v in sizes) for sizes in (counts, window, shift))
    for f, c, w, s in zip(feat_size, counts, window, shift):
        torch._check(c >= 1)
        torch._check(w >= 1)
        torch._check(w <= f)
        torch._check(c * w >= f)  # the padded map covers the map,
        torch._check(c * w - f < w)  # by less than one window
        torch._check(s < f)
    return counts, window, shift


@register_notrace_module  # pads by the input size: a leaf for torch.fx
class PatchMerging(_TimmPatchMerging):
    """ timm's PatchMerging (same parameters), its (B, H, W, C) input zero-padded to even sizes through floor
    division: timm's own `size % 2` pad is then zero (why: see flatten_timm.layers.PatchEmbed)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, H, W, _ = x.shape
        return super().forward(pad_nhwc(x, tile_padding(H, 2), tile_padding(W, 2)))


class WindowAttention(nn.Module):
    """ Softmax window attention with a relative position bias (fused SDPA when enabled)."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            window_size: Size,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = to_2tuple(window_size)
        self.fused_attn = use_fused_attn()
        num_offsets = (2 * self.window_size[0] - 1) * (2 * self.window_size[1] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_offsets, num_heads, **dd))
        self.register_buffer('relative_position_index', relative_position_index(
            self.window_size, self.window_size, device=device), persistent=False)
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=.02)
        self._index_cache = LruCache()

    def _relative_position_index(self, window: Size) -> torch.Tensor:
        """Indices into the bias table for a window: the buffer for the trained window; for a smaller one (small
        feature map), the part of the table it covers, cached per window, or built in the graph where the window
        may be a symbol (a cache filled in a compiled graph would fail its guards on the next call: a recompile)."""
        if not is_exporting() and tuple(window) == self.window_size:
            return self.relative_position_index
        device = self.relative_position_index.device
        if is_symbolic():
            return relative_position_index(window, self.window_size, device=device)
        return self._index_cache.lookup(
            (tuple(window), device), lambda: relative_position_index(window, self.window_size, device=device))

    def relative_position_bias(self, window: Size) -> torch.Tensor:
        n = window[0] * window[1]
        index = self._relative_position_index(window).reshape(n * n)
        return self.relative_position_bias_table[index].reshape(n, n, self.num_heads).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, window: Size, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B_, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B_, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.relative_position_bias(window).unsqueeze(0)
        if mask is not None:
            num_win = mask.shape[0]
            bias = (bias.unsqueeze(1) + mask.unsqueeze(1).unsqueeze(0)).expand(B_ // num_win, -1, -1, -1, -1)
            bias = bias.reshape(B_, self.num_heads, N, N)
        x = softmax_attention(
            q, k, v, bias.to(q.dtype), dropout_p=self.attn_drop.p if self.training else 0., fused=self.fused_attn)
        x = x.transpose(1, 2).reshape(B_, N, C)
        return self.proj_drop(self.proj(x))


@register_notrace_module  # shape-dependent control flow (grids, windows, padding): a leaf for torch.fx
class FlattenSwinBlock(nn.Module):
    """ Swin block, NHWC in and out, with focused linear ('L') or softmax ('S') window attention."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            grid_size: Size,
            window_size: int,
            shift: bool = False,
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
        self.target_window = to_2tuple(window_size)
        self.target_shift = tuple(w // 2 for w in self.target_window) if shift else (0, 0)
        # the window the weights were trained with: a map no larger than the window is one window, unshifted
        _, window, _ = self.window_and_shift(grid_size)
        self.norm1 = norm_layer(dim, **dd)
        self.linear = attn_type == 'L'
        if attn_type == 'L':
            self.attn = FocusedLinearAttention(
                dim, num_heads, grid_size=window, qkv_bias=qkv_bias, focusing_factor=focusing_factor,
                kernel_size=kernel_size, proj_drop=proj_drop, **dd)
        elif attn_type == 'S':
            self.attn = WindowAttention(
                dim, num_heads, window_size=window, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, **dd)
        else:
            raise ValueError(f"attn_type must be 'L' (focused linear) or 'S' (softmax), got {attn_type!r}")
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self._mask_cache = LruCache()  # masks per map size: the recent sizes' only
        # the shift mask of the training grid kept as a buffer (as timm's Swin does): a compiled graph reads it,
        # where building it from aranges inside the softmax's kernel made that kernel 3x slower on a CPU
        self.mask_layout = self.window_and_shift(grid_size)
        mask = None
        if not self.linear and any(self.mask_layout[2]):
            mask = shifted_window_mask(*self.mask_layout, device=device)
        self.register_buffer('attn_mask', mask, persistent=False)

    def window_and_shift(self, feat_size: Size) -> Tuple[Size, Size, Size]:
        """Window count, window and shift for a map: windows of min(map, target window), none shifted where
        one covers the map. Symbolic while exporting (formulas without branches)."""
        counts = tuple(tile_count(f, w) for f, w in zip(feat_size, self.target_window))
        window = tuple(size_min(f, w) for f, w in zip(feat_size, self.target_window))
        shift = tuple(s * size_gt(f, w) for f, w, s in zip(feat_size, self.target_window, self.target_shift))
        return counts, window, shift

    def _shift_mask(self, counts: Size, window: Size, shift: Size, device) -> torch.Tensor:
        if self.attn_mask is not None and not is_exporting() and (counts, window, shift) == self.mask_layout:
            return self.attn_mask
        if is_symbolic():  # sizes may be symbols, and a cache filled in a compiled graph would recompile
            return shifted_window_mask(counts, window, shift, device=device)
        return self._mask_cache.lookup(
            (counts, window, shift, device), lambda: shifted_window_mask(counts, window, shift, device=device))

    def _window_layout(self, feat_size: Size) -> Tuple[Size, Size, Size]:
        """`window_and_shift`, as fresh size symbols under torch.export (see `_fresh_window_sizes`)."""
        counts, window, shift = self.window_and_shift(feat_size)
        if is_torch_exporting():
            return _fresh_window_sizes(feat_size, counts, window, shift)
        return counts, window, shift

    @staticmethod
    def _is_one_window(window: Size, feat_size: Size) -> bool:
        """Whether one window covers the whole map (attention on it needs no copies). Never while exporting: an
        exported graph takes the windowed path at every size (the window is a symbol there)."""
        return not is_exporting() and window == feat_size

    @staticmethod
    def _is_shifted(shift: Size) -> bool:
        """Whether the map is rolled by the shift: always while exporting, where the shift is a symbol that may
        be zero at some sizes."""
        return is_exporting() or any(shift)

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        counts, window, shift = self._window_layout((H, W))
        if self._is_one_window(window, (H, W)):
            return self.attn(x.reshape(B, H * W, C), window).reshape(B, H, W, C)
        shifted = self._is_shifted(shift)
        if shifted:
            x = roll_hw(x, shift, back=True)
        x = pad_nhwc(x, counts[0] * window[0] - H, counts[1] * window[1] - W)

        num_windows = B * counts[0] * counts[1]
        windows = partition_windows(x, counts, window).reshape(num_windows, window[0] * window[1], C)
        if self.linear:
            # as released, linear windows are not masked after the shift
            windows = self.attn(windows, window)
        else:
            mask = self._shift_mask(counts, window, shift, x.device) if shifted else None
            windows = self.attn(windows, window, mask=mask)
        x = merge_windows(windows.reshape(num_windows, window[0], window[1], C), B, counts, window)[:, :H, :W]
        if shifted:
            x = roll_hw(x, shift)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class FlattenSwinStage(nn.Module):
    """ Patch merging (stages after the first), then Swin blocks; NHWC in and out."""

    def __init__(
            self,
            dim: int,
            out_dim: int,
            depth: int,
            grid_size: Size,
            downsample: bool,
            num_heads: int,
            window_size: int,
            attn_type: str,
            drop_path: Sequence[float] = (),
            norm_layer=nn.LayerNorm,
            device=None,
            dtype=None,
            **block_kwargs,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.grad_checkpointing = False
        self.downsample = PatchMerging(dim, out_dim, norm_layer=norm_layer, **dd) if downsample else nn.Identity()
        drop_path = list(drop_path) or [0.] * depth
        self.blocks = nn.Sequential(*[
            FlattenSwinBlock(
                out_dim, num_heads, grid_size=grid_size, window_size=window_size, shift=i % 2 == 1,
                attn_type=attn_type, drop_path=drop_path[i], norm_layer=norm_layer, **block_kwargs, **dd)
            for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x


class FlattenSwin(FlattenModel):
    """ FLatten-Swin Transformer.

    Args:
        img_size: training resolution; sets the windows the weights expect.
        window_size: window of the focused linear blocks (56 at 224, 96 at 384).
        softmax_window_size: window of the softmax blocks; default 7, or 12 when window_size > 56.
        attn_type: per stage, 'L' focused linear or 'S' softmax attention.
        focusing_factor, kernel_size: of the focused linear attention.
    """
    output_fmt = 'NHWC'

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dim: int = 96,
            depths: Sequence[int] = (2, 2, 6, 2),
            num_heads: Sequence[int] = (3, 6, 12, 24),
            window_size: int = 56,
            softmax_window_size: Optional[int] = None,
            attn_type: str = 'LLSS',
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            focusing_factor: float = 3,
            kernel_size: int = 5,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.1,
            norm_layer=nn.LayerNorm,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        num_stages = len(depths)
        num_heads = resolve_stage_args('num_heads', num_heads, num_stages)
        attn_type = resolve_stage_args('attn_type', attn_type, num_stages)
        if softmax_window_size is None:
            softmax_window_size = 7 if window_size <= 56 else 12
        img_size = to_2tuple(img_size)
        self._init_common(in_chans, num_classes, global_pool)
        embed_dims = [int(embed_dim * 2 ** i) for i in range(num_stages)]

        self.patch_embed = PatchEmbed(
            img_size=None, patch_size=4, in_chans=in_chans, embed_dim=embed_dim, norm_layer=norm_layer,
            flatten=False, output_fmt='NHWC', strict_img_size=False, **dd)

        dpr = stage_drop_path_rates(drop_path_rate, depths)
        stages = []
        for i in range(num_stages):
            reduction = stage_reduction(i)
            stages.append(FlattenSwinStage(
                embed_dims[max(i - 1, 0)],
                embed_dims[i],
                depth=depths[i],
                grid_size=(img_size[0] // reduction, img_size[1] // reduction),
                downsample=i > 0,
                num_heads=num_heads[i],
                window_size=window_size if attn_type[i] == 'L' else softmax_window_size,
                attn_type=attn_type[i],
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                focusing_factor=focusing_factor,
                kernel_size=kernel_size,
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=dpr[i],
                norm_layer=norm_layer,
                **dd,
            ))
        self._init_stages(stages, embed_dims)

        self.norm = norm_layer(embed_dims[-1], **dd)
        self._init_head(embed_dims[-1], drop_rate, **dd)
        self.apply(init_weights)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {k for k, _ in self.named_parameters() if 'relative_position_bias_table' in k}

    def checkpoint_filter(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return checkpoint_filter_fn(state_dict, self)


def checkpoint_filter_fn(state_dict, model: FlattenSwin):
    """ Official FLatten-Swin checkpoint (bare or under 'model') -> this layout, resized to the model.

    The official layout merges patches at the end of a stage, this one at the start of the next.
    """
    state_dict = unwrap_state_dict(state_dict)
    if any(k.startswith('layers.') for k in state_dict):
        state_dict = rename_keys(state_dict, [
            (r'^layers\.(\d+)\.downsample\.', lambda m: f'stages.{int(m.group(1)) + 1}.downsample.'),
            (r'^layers\.', 'stages.'),
        ])
    return fit_state_dict_to_model(state_dict, model)


def _create_flatten_swin(variant: str, pretrained: bool = False, **kwargs) -> FlattenSwin:
    return build_flatten_model(
        FlattenSwin, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


default_cfgs = generate_default_cfgs({
    'flatten_swin_tiny_patch4_224.in1k': official_cfg('e1518e76703e4e57a7f2', 'flatten_swin_t.pth'),
    'flatten_swin_small_patch4_224.in1k': official_cfg('94188e52af354bf4a88b', 'flatten_swin_s.pth'),
    'flatten_swin_base_patch4_224.in1k': official_cfg('7a9e5186bad04e7fb3a9', 'flatten_swin_b.pth'),
    # the 384 fine-tune is evaluated with a direct resize to 384, no crop
    'flatten_swin_base_patch4_384.in1k': official_cfg(
        '0d0330cf2e5249f1abb6', 'flatten_swin_b_384.pth', input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0),
})


@register_model
def flatten_swin_tiny_patch4_224(pretrained: bool = False, **kwargs) -> FlattenSwin:
    model_args = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=56)
    return _create_flatten_swin('flatten_swin_tiny_patch4_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def flatten_swin_small_patch4_224(pretrained: bool = False, **kwargs) -> FlattenSwin:
    model_args = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=56)
    return _create_flatten_swin('flatten_swin_small_patch4_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def flatten_swin_base_patch4_224(pretrained: bool = False, **kwargs) -> FlattenSwin:
    model_args = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=56)
    return _create_flatten_swin('flatten_swin_base_patch4_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def flatten_swin_base_patch4_384(pretrained: bool = False, **kwargs) -> FlattenSwin:
    model_args = dict(
        img_size=384, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=96)
    return _create_flatten_swin('flatten_swin_base_patch4_384', pretrained=pretrained, **dict(model_args, **kwargs))
