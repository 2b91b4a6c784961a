""" FocusedLinearAttention (tokens) and FocusedLinearAttention2d (channels-first maps): the paper's steps.

Project q, k and v, the kernel's 1 / s and its 1e-6 shift folded into the q and k projections (training,
autocast, traced graphs, a GPU, narrow layers) or applied to q and k by one pass (wide layers' CPU inference in
the parameters' dtype); attend (dispatch.py picks the implementation); the depthwise conv of V that restores
the rank; project out. Keys and values may come from a spatially reduced grid (PVT).
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module

from ..fused_inference import Linear, fused_linear
from ..grid_tokens import (
    channels_last_to_tokens, map_to_tokens, resample_grid_tokens, tokens_to_channels_last, tokens_to_map)
from ..parameter_cache import ParameterCache
from ..spatial_reduction import SpatialReduction
from ..symbolic_shapes import is_exporting
from .dispatch import resolve_attn_impl, run_focused_linear_attention
from .spec import focusing_map, linear_attention

__all__ = ['FocusedLinearAttention', 'FocusedLinearAttention2d']

_KERNEL_SHIFT = 1e-6  # the kernel is (relu(x) + 1e-6) / s


def _projection_dtype(x: torch.Tensor, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype a linear layer computes in on x's device: autocast's when it is on, else the parameters'."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return param_dtype


_WeightBias = Tuple[torch.Tensor, Optional[torch.Tensor]]


def _weight_and_bias(weight: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype) -> _WeightBias:
    """(weight, bias) in `dtype`: the tensors themselves where they have it."""
    return weight.to(dtype), None if bias is None else bias.to(dtype)


def _split_rows(linear: nn.Linear, first_rows: int) -> Tuple[_WeightBias, _WeightBias]:
    """(weight, bias) of the first `first_rows` outputs of `linear` and of the others: views of its parameters.
    Split, not sliced: in a training step one backward op joins the parts' gradients."""
    rows = (first_rows, linear.out_features - first_rows)
    weight, rest_weight = linear.weight.split(rows)
    bias, rest_bias = (None, None) if linear.bias is None else linear.bias.split(rows)
    return (weight, bias), (rest_weight, rest_bias)


def _fold_kernel_into(linear: nn.Linear, inv_scale: torch.Tensor, num_kernel_parts: int, dtype: torch.dtype
                      ) -> Tuple[_WeightBias, Optional[_WeightBias]]:
    """(weight, bias) of the first num_kernel_parts C-wide outputs of `linear` (q and/or k) shifted and divided
    by the scale, and (weight, bias) of its other outputs (v) as they are (None if it has none), all in `dtype`.

    (W x + b + 1e-6) / s is one matmul with the rows of W and b scaled: no pass over the tokens is added. The
    other rows are left alone (a training step computes this on every call: few ops, none over v's rows).
    """
    C = inv_scale.shape[0]
    (weight, bias), (rest_weight, rest_bias) = _split_rows(linear, num_kernel_parts * C)
    weight = (weight.unflatten(0, (num_kernel_parts, C)) * inv_scale.unsqueeze(-1)).flatten(0, 1)
    shift = _KERNEL_SHIFT if bias is None else bias.unflatten(0, (num_kernel_parts, C)) + _KERNEL_SHIFT
    bias = (shift * inv_scale).expand(num_kernel_parts, C).flatten()
    rest = _weight_and_bias(rest_weight, rest_bias, dtype) if rest_weight.shape[0] else None
    return (weight.to(dtype), bias.to(dtype)), rest


# Widest layer whose inference on a CPU keeps its q/k projections with the kernel's scale folded in: 2 * 256^2
# values, 0.5 MiB in float32. Wider layers apply the scale to q and k by one pass instead and keep no copy. A
# pass costs in proportion to the tokens times C, the projection to the tokens times C^2: at C = 384 it costs
# FLatten-DeiT-S 0.3% at 224 px and spares it 14 MiB; at C = 64-128 it cost FLatten-CSWin-T 1.9% at 800x1344
# px to spare 0.3 MiB.
FOLDED_PROJECTION_MAX_ELEMENTS = 2 * 256 ** 2


@register_notrace_module  # shape-dependent control flow (grids, windows, padding): a leaf for torch.fx
class FocusedLinearAttention(nn.Module):
    """ Focused linear attention over tokens on an H x W grid, (B, H*W, C) -> (B, H*W, C).

    Args:
        dim: channels.
        num_heads: attention heads.
        grid_size: query grid at the training resolution; sizes the key positional encoding.
        qkv_bias: bias in the q/k/v projections.
        sr_ratio: keys/values from a conv with kernel = stride = sr_ratio (PVT); 1 for none.
        pool_size: keys/values from an adaptive pool to pool_size x pool_size (PVTv2 "linear" mode).
        focusing_factor: the power p of the focusing function (3 in the released models).
        kernel_size: kernel of the rank-restoring depthwise conv on V (5 in the released models).
        proj_drop: dropout after the output projection.
        attn_impl: 'auto' (the faster of torch ops and the fused Triton kernels, timed once per shape on CUDA),
            'torch', 'triton', or 'reference' (the spec's order of operations); FLATTEN_ATTN_IMPL overrides.
        max_cached_table_elements: inference keeps the key encoding resized to another grid only up to this many
            values (None: at any size; see `parameter_cache.MAX_CACHED_TABLE_ELEMENTS`).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            grid_size: Tuple[int, int] = (14, 14),
            qkv_bias: bool = True,
            sr_ratio: int = 1,
            pool_size: Optional[int] = None,
            focusing_factor: float = 3,
            kernel_size: int = 5,
            proj_drop: float = 0.,
            attn_impl: str = 'auto',
            max_cached_table_elements: Optional[int] = None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if dim % num_heads:
            raise ValueError(f'dim {dim} must be divisible by num_heads {num_heads}')
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.focusing_factor = focusing_factor

        if sr_ratio > 1 or pool_size:
            self.qkv = None
            self.q = Linear(dim, dim, bias=qkv_bias, **dd)
            self.kv = Linear(dim, dim * 2, bias=qkv_bias, **dd)
            self.sr = SpatialReduction(dim, sr_ratio, pool_size, **dd)
            self.key_grid_size = self.sr.output_size(grid_size)
        else:
            # one fused projection when queries and keys see the same tokens
            self.qkv = Linear(dim, dim * 3, bias=qkv_bias, **dd)
            self.q = self.kv = self.sr = None
            self.key_grid_size = tuple(grid_size)

        # one depthwise kernel shared by all heads, as in the paper
        self.dwc = nn.Conv2d(self.head_dim, self.head_dim, kernel_size, padding=kernel_size // 2,
                             groups=self.head_dim, **dd)
        self.scale = nn.Parameter(torch.zeros(1, 1, dim, **dd))
        self.positional_encoding = nn.Parameter(
            torch.zeros(1, self.key_grid_size[0] * self.key_grid_size[1], dim, **dd))
        self.proj = Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self._folded = ParameterCache()
        self.max_cached_table_elements = max_cached_table_elements
        resolve_attn_impl(attn_impl, env_override='')  # fail early on a typo
        self.attn_impl = attn_impl

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, num_heads={self.num_heads}, focusing_factor={self.focusing_factor}, '
                f'key_grid_size={self.key_grid_size}')

    def key_positional_encoding(self, key_size: Tuple[int, int]) -> torch.Tensor:
        """The key positional encoding resized to the actual key grid: (1, n, C), a row per key. (Inference adds
        it by `add_key_encoding`: a subclass that changes one changes the other.)"""
        return resample_grid_tokens(self.positional_encoding, self.key_grid_size, key_size)

    def project(self, x: torch.Tensor, feat_size: Tuple[int, int]):
        """Project (B, H*W, C) tokens to q, k, v; returns them and the key grid size."""
        if self.qkv is not None:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            return q, k, v, feat_size
        q = self.q(x)
        x, key_size = self.sr(x, feat_size)
        k, v = self.kv(x).chunk(2, dim=-1)
        return q, k, v, key_size

    def local_mixing_kernel(self) -> Tuple[torch.Tensor, Optional[torch.Tensor], int]:
        """Weight (C, 1, k, k), bias and padding of the depthwise conv that mixes V locally: the rank-restoring
        conv, its one kernel repeated for every head. Families that add more depthwise convs of the same V
        (CSWin's LePE) add their kernels to it, so all of them run as one conv. The padding is a Python int
        (an exported conv needs constant sizes)."""
        weight, bias = self.dwc.weight, self.dwc.bias
        if self.num_heads > 1:  # (a repeat copies even once: with one head, the conv's own parameters)
            weight = weight.repeat(self.num_heads, 1, 1, 1)
            bias = bias.repeat(self.num_heads) if bias is not None else None
        return weight, bias, self.dwc.padding[0]

    def local_mixing(self, v: torch.Tensor, feat_size: Tuple[int, int], kernel: Optional[tuple] = None
                     ) -> torch.Tensor:
        """The local mixing of V on the query grid, all heads at once: (B, n, C) -> (B, H*W, C).
        kernel: `local_mixing_kernel()`'s result, if at hand."""
        C = v.shape[-1]
        H, W = feat_size
        if self.sr is not None:
            # keys were reduced: stretch V back to N tokens along the flattened token axis (as released)
            v = F.interpolate(v.transpose(1, 2), size=H * W, mode='linear').transpose(1, 2)
        weight, bias, padding = kernel if kernel is not None else self.local_mixing_kernel()
        out = F.conv2d(tokens_to_channels_last(v, feat_size), weight.to(v.dtype),
                       bias.to(v.dtype) if bias is not None else None, padding=padding, groups=C)
        return channels_last_to_tokens(out)

    def attend(
            self,
            q: torch.Tensor,
            k: torch.Tensor,
            v: torch.Tensor,
            feat_size: Tuple[int, int],
            key_size: Tuple[int, int],
    ) -> torch.Tensor:
        """Reference path: the spec's order of operations on (B, N, C) q and (B, n, C) k, v, before `proj`."""
        k = k + self.key_positional_encoding(key_size).to(k.dtype)
        scale = F.softplus(self.scale)
        q = focusing_map(q, scale, self.focusing_factor)
        k = focusing_map(k, scale, self.focusing_factor)
        x = linear_attention(q, k, v, self.num_heads)
        return x + self.local_mixing(v, feat_size)

    def _apply(self, fn, *args, **kwargs):
        # a move frees parameter storages whose addresses the next ones may reuse: forget what came from them
        self._folded.clear()
        return super()._apply(fn, *args, **kwargs)

    def _local_mixing_kernel_in(self, dtype: torch.dtype) -> tuple:
        """`local_mixing_kernel()` with its weight and bias in `dtype`."""
        weight, bias, padding = self.local_mixing_kernel()
        return (*_weight_and_bias(weight, bias, dtype), padding)

    def folded_parameters(self, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, tuple, tuple]:
        """What `project_folded` computes from the parameters: the kernel's 1 / s and floor 1e-6 / s (in the
        parameters' dtype), the (weight, bias) pairs of the projections with 1 / s and the shift folded in (q and
        k's then v's of a fused qkv, else q's then kv's) and `local_mixing_kernel()`, both in `dtype` (the
        projections' compute dtype). Kept between inference calls (under autocast) while the parameters stay
        the same."""
        def fold():
            inv_scale = 1 / F.softplus(self.scale.reshape(-1))
            if self.qkv is not None:
                projections = _fold_kernel_into(self.qkv, inv_scale, 2, dtype)
            else:
                (k_weight, k_bias), (v_weight, v_bias) = _fold_kernel_into(self.kv, inv_scale, 1, dtype)
                # one matmul for k and v: k's rows carry the shift as a bias even where the layer has none
                v_bias = k_bias.new_zeros(v_weight.shape[0]) if v_bias is None else v_bias
                kv = (torch.cat([k_weight, v_weight]), torch.cat([k_bias, v_bias]))
                projections = (_fold_kernel_into(self.q, inv_scale, 1, dtype)[0], kv)
            return inv_scale, inv_scale * _KERNEL_SHIFT, projections, self._local_mixing_kernel_in(dtype)
        return self._folded.get(dtype, self.parameters(), fold)

    def _scaled_key_encoding(self, key_size: Tuple[int, int], inv_scale: torch.Tensor, dtype: torch.dtype):
        """The key positional encoding at key_size, divided by the kernel's scale, in `dtype` (`project_folded`'s).
        Kept for inference at the training grid and at other grids up to `max_cached_table_elements`."""
        def scale():
            return (self.key_positional_encoding(key_size) * inv_scale).to(dtype)
        if not ParameterCache.active():  # (checked first: the key size may be a symbol)
            return scale()
        key_size = (int(key_size[0]), int(key_size[1]))
        if not self._keeps_table(key_size):
            # resized from the parameter, so a table of its own: scaled in place, one activation-sized buffer fewer
            return self.key_positional_encoding(key_size).mul_(inv_scale).to(dtype)
        return self._folded.get((*key_size, dtype), (self.positional_encoding, self.scale), scale)

    def _keeps_table(self, key_size: Tuple[int, int]) -> bool:
        """Whether inference keeps a table of the key encoding at this (int) key grid: `max_cached_table_elements`."""
        limit = self.max_cached_table_elements
        return key_size == self.key_grid_size or limit is None or key_size[0] * key_size[1] * self.dim <= limit

    def add_key_encoding(self, k: torch.Tensor, key_size: Tuple[int, int]):
        """Inference (`project_scaled`): add `key_positional_encoding(key_size)` to the (B, n, C) keys in place,
        without building that table at the training grid (the parameter itself is added); a resized table is kept
        up to `max_cached_table_elements`."""
        key_size = (int(key_size[0]), int(key_size[1]))

        def resized():  # the parameter itself at its own grid
            return resample_grid_tokens(self.positional_encoding, self.key_grid_size, key_size)
        if key_size != self.key_grid_size and self._keeps_table(key_size):
            k.add_(self._folded.get(('key encoding', *key_size), (self.positional_encoding,), resized))
        else:
            k.add_(resized())

    def inference_parameters(self, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, tuple, tuple]:
        """What `project_scaled` computes from the parameters: the kernel's 1 / s and floor 1e-6 / s, each
        repeated for every q/k part of a projection's output (q and k of a fused qkv, else q's alone and k's
        alone), the projections' (weight, bias) as they are (q and k's then v's of a fused qkv, else q's then
        kv's) and `local_mixing_kernel()`, in `dtype`. Kept between inference calls while the parameters stay
        the same: a few vectors, no copy of a weight."""
        def compute():
            inv_scale = (1 / F.softplus(self.scale.reshape(-1))).to(dtype)
            parts = 2 if self.qkv is not None else 1
            inv_scale, floor = inv_scale.repeat(parts), (inv_scale * _KERNEL_SHIFT).repeat(parts)
            if self.qkv is not None:  # q and k's rows, then v's
                qk, v = _split_rows(self.qkv, 2 * self.dim)
                projections = (_weight_and_bias(*qk, dtype), _weight_and_bias(*v, dtype))
            else:
                projections = (_weight_and_bias(self.q.weight, self.q.bias, dtype),
                               _weight_and_bias(self.kv.weight, self.kv.bias, dtype))
            return inv_scale, floor, projections, self._local_mixing_kernel_in(dtype)
        return self._folded.get(('inference', dtype), self.parameters(), compute)

    def project_folded(self, x: torch.Tensor, feat_size: Tuple[int, int]):
        """q and k with the kernel's 1 / s and its 1e-6 shift folded in (they ride in the projections' own bias
        add, so the focusing map starts with one max() instead of relu, add and divide), v, the key grid size,
        the kernel's floor, the scaled key positional encoding and the local mixing kernel."""
        compute_dtype = _projection_dtype(x, self.scale.dtype)
        inv_scale, floor, projections, mixing_kernel = self.folded_parameters(compute_dtype)
        if self.qkv is not None:
            x = x.to(compute_dtype)  # autocast would cast x for each of the two matmuls
            q, k = fused_linear(x, *projections[0]).chunk(2, dim=-1)
            # v by its own matmul: contiguous, so the depthwise conv reads it as a map without a layout copy
            # (one more small GEMM reading x, one copy of v fewer; and training keeps no copy of v)
            v = fused_linear(x, *projections[1])
            key_size = feat_size
        else:
            q = fused_linear(x, *projections[0])
            x, key_size = self.sr(x, feat_size)
            k, v = fused_linear(x, *projections[1]).chunk(2, dim=-1)
        key_encoding = self._scaled_key_encoding(key_size, inv_scale, k.dtype)
        return q, k, v, key_size, floor, key_encoding, mixing_kernel

    def _scales_in_a_pass(self, x: torch.Tensor) -> bool:
        """Whether this call takes `project_scaled`: CPU inference in the parameters' dtype (no autocast, no graph
        traced) of a layer wider than `FOLDED_PROJECTION_MAX_ELEMENTS` allows to fold. Elsewhere the folded
        projections: on a GPU a pass is one more launch per layer (and the Triton kernels add the key encoding in
        their loads), and training needs the folded weights' gradients anyway."""
        return (x.device.type == 'cpu' and 2 * self.dim * self.dim > FOLDED_PROJECTION_MAX_ELEMENTS
                and x.dtype == self.scale.dtype and ParameterCache.active()
                and _projection_dtype(x, self.scale.dtype) == self.scale.dtype)

    def project_scaled(self, x: torch.Tensor, feat_size: Tuple[int, int]):
        """`project_folded`'s q and k, v and the rest, for CPU inference in the parameters' dtype: the projections as
        they are, the key encoding added to k, then one pass over q and k shifts them and divides them by the
        kernel's scale. No folded copy of the projections is kept (two thirds of every qkv weight, 14 MiB for
        FLatten-DeiT-S); see `FOLDED_PROJECTION_MAX_ELEMENTS` for what the pass costs."""
        inv_scale, floor, projections, mixing_kernel = self.inference_parameters(x.dtype)
        C = self.dim
        if self.qkv is not None:
            qk = fused_linear(x, *projections[0])
            v = fused_linear(x, *projections[1])  # its own matmul: contiguous for the depthwise conv
            kernel_inputs, key_size = (qk,), feat_size
            q, k = qk.chunk(2, dim=-1)
        else:
            q = fused_linear(x, *projections[0])
            x, key_size = self.sr(x, feat_size)
            k, v = fused_linear(x, *projections[1]).chunk(2, dim=-1)
            kernel_inputs = (q, k)
        self.add_key_encoding(k, key_size)
        for t in kernel_inputs:  # (x + 1e-6) / s, in place
            torch.addcmul(floor, t, inv_scale, out=t)
        return q, k, v, key_size, floor[:C], None, mixing_kernel

    def forward(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        impl = resolve_attn_impl(self.attn_impl)
        if impl == 'reference':
            q, k, v, key_size = self.project(x, feat_size)
            return self.proj_drop(self.proj(self.attend(q, k, v, feat_size, key_size)))
        project = self.project_scaled if self._scales_in_a_pass(x) else self.project_folded
        q, k, v, key_size, floor, key_encoding, mixing_kernel = project(x, feat_size)
        rank_restoration = self.local_mixing(v, feat_size, mixing_kernel)
        # q, k and the residual are this call's own buffers: the attention may use them as scratch space
        x = run_focused_linear_attention(q, k, v, floor, self.focusing_factor, self.num_heads,
                                         residual=rank_restoration, key_offset=key_encoding, attn_impl=impl,
                                         overwrite_inputs=True)
        return self.proj_drop(self.proj(x))


class FocusedLinearAttention2d(FocusedLinearAttention):
    """ Focused linear attention on a feature map, (B, C, H, W) -> (B, C, H, W), for CNN necks.

    A drop-in attention for YOLO / RT-DETR style necks at any map size, square or not. The key
    positional encoding is a learned parameter at `grid_size` (the map size at the training
    resolution, e.g. 20 x 20 for the stride-32 map of a 640 image) and is resized to the map in use.
    The attention is FocusedLinearAttention's own; only the layout changes.

    Args:
        dim: channels of the map.
        num_heads: attention heads (dim must divide by it).
        grid_size: the map size the positional encoding is learned at.
        sr_ratio: keys/values from a strided conv of this ratio (1: none); maps must be at least this large.
        focusing_factor, kernel_size, qkv_bias, proj_drop, attn_impl: as FocusedLinearAttention.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int = 8,
            grid_size: Tuple[int, int] = (20, 20),
            sr_ratio: int = 1,
            focusing_factor: float = 3,
            kernel_size: int = 5,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            attn_impl: str = 'auto',
            device=None,
            dtype=None,
    ):
        grid_size = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
        super().__init__(
            dim, num_heads=num_heads, grid_size=grid_size, qkv_bias=qkv_bias, sr_ratio=sr_ratio,
            focusing_factor=focusing_factor, kernel_size=kernel_size, proj_drop=proj_drop, attn_impl=attn_impl,
            device=device, dtype=dtype)
        self.sr_ratio = sr_ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.dim:
            raise ValueError(f'{type(self).__name__}(dim={self.dim}) expects a (B, {self.dim}, H, W) map, '
                             f'got shape {tuple(x.shape)}')
        B, C, H, W = x.shape
        if not is_exporting() and min(H, W) < self.sr_ratio:  # sizes are symbols in an exported graph
            raise ValueError(f'a {H}x{W} map is smaller than sr_ratio={self.sr_ratio}: use a smaller sr_ratio '
                             f'for maps this small')
        # tokens copied once from a channels-first map: the q/k and v projections would each copy it otherwise
        out = super().forward(map_to_tokens(x).contiguous(), (H, W))
        return tokens_to_map(out, (H, W))
