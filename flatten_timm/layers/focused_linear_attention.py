""" Focused linear attention (FLatten Transformer, Han et al., ICCV 2023).

Linear attention with a ReLU kernel sharpened by a norm-preserving power ("focusing"), a learnable
per-channel scale, a learnable key positional encoding, and a depthwise conv on V that restores the
rank of the attention matrix. Keys/values may come from a spatially reduced grid (PVT).

This is the one implementation of the math that every flatten_* family uses.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from timm.layers import register_notrace_module

from .grid_tokens import (
    GridTableResizer, channels_last_to_tokens, map_to_tokens, tokens_to_channels_last, tokens_to_map)
from .fused_inference import Linear, fused_linear
from .parameter_cache import ParameterCache
from .attn_impl import SELECTOR, resolve_attn_impl, selection_key, triton_available
from .spatial_reduction import SpatialReduction
from .symbolic_shapes import is_exporting

__all__ = ['FocusedLinearAttention', 'FocusedLinearAttention2d', 'focused_linear_attention', 'focusing_map',
           'linear_attention', 'run_focused_linear_attention']


def focusing_map(x: torch.Tensor, scale: torch.Tensor, focusing_factor: float) -> torch.Tensor:
    """phi_p(x): ReLU kernel, divided by a learned scale, raised to power p at unchanged L2 norm.

    Computed in float32 at least: the power overflows fp16 and loses the norm in bf16.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    x = (F.relu(x.to(dtype)) + 1e-6) / scale.to(dtype)
    x_norm = x.norm(dim=-1, keepdim=True)
    x_pow = x ** focusing_factor
    return (x_pow / x_pow.norm(dim=-1, keepdim=True)) * x_norm


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Multi-head linear attention phi(q) (phi(k)^T v) / (phi(q) . mean phi(k)).

    q: (B, N, C), k and v: (B, n, C); q and k already mapped (float32 from focusing_map), v in the
    compute dtype. Returns (B, N, C) in v's dtype, heads merged.
    """
    B, N, C = q.shape
    n = k.shape[1]
    q = q.reshape(B, N, num_heads, -1).transpose(1, 2)
    k = k.reshape(B, n, num_heads, -1).transpose(1, 2)
    v = v.reshape(B, n, num_heads, -1).transpose(1, 2)
    # the normaliser in q's precision (float32): a product and a sum, which autocast leaves alone
    z = 1 / ((q * k.mean(dim=-2, keepdim=True)).sum(dim=-1, keepdim=True) + 1e-6)
    if v.dtype in (torch.float16, torch.bfloat16):
        # a query whose ReLU is all zero maps to ~1e-6, below fp16's normal range: its per-query scale
        # cancels between numerator and normaliser, so bring it to unit norm before the cast
        q_norm = q.norm(dim=-1, keepdim=True)
        q, z = q / q_norm, z * q_norm
    # k^T v / n, each factor scaled by n**-0.5 to stay inside the fp16 range
    kv = (k.to(v.dtype).transpose(-2, -1) * (n ** -0.5)) @ (v * (n ** -0.5))
    x = ((q.to(v.dtype) @ kv) * z).to(v.dtype)
    return x.transpose(1, 2).reshape(B, N, C)


def _focused(x: torch.Tensor, floor: torch.Tensor, p: float, dtype: torch.dtype, in_place: bool,
             overwrite: bool = False) -> torch.Tensor:
    """phi_p(t) of the kernel t = max(x, floor) over the last dim, rounded to dtype. t is in floor's dtype
    (float32 or wider: max() promotes a lower-precision x in its own pass). in_place: the power and the scaling
    overwrite t; overwrite: t overwrites x, when x has floor's dtype."""
    t = torch.maximum(x, floor, out=x) if overwrite and x.dtype == floor.dtype else torch.maximum(x, floor)
    norm = torch.linalg.vector_norm(t, dim=-1, keepdim=True)
    t = t.pow_(p) if in_place else t ** p
    pow_norm = torch.linalg.vector_norm(t, dim=-1, keepdim=True)
    if not in_place:
        return (t * (norm / pow_norm)).to(dtype)
    # the scaling also rounds to dtype: one pass, written over t when it already has that dtype
    return torch.mul(t, torch.div(norm, pow_norm), out=t if t.dtype == dtype else torch.empty_like(t, dtype=dtype))


def _adjacent_halves(q: torch.Tensor, k: torch.Tensor) -> Optional[torch.Tensor]:
    """q and k as one (B, N, 2, C) view when k's channels follow q's in the same rows (the two halves of one
    projection's output), else None. Eager tensors only: traced ones have no storage to compare."""
    C = q.shape[-1]
    if (q.shape != k.shape or q.stride() != k.stride() or q.dtype != k.dtype or q.stride(-1) != 1
            or q.stride(1) < 2 * C or k.storage_offset() - q.storage_offset() != C
            or q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()):
        return None
    return q.as_strided((q.shape[0], q.shape[1], 2, C), (q.stride(0), q.stride(1), C, 1))


class _FocusingKernel:
    """t = max(x, floor) in float32 (or wider) and what the focusing map's backward needs of it: ||t||, t**(p-1),
    a = 1 / ||t**p|| and the unit u = t**p a (norms over C). Recomputed in backward from x, which is kept."""

    def __init__(self, x: torch.Tensor, floor: torch.Tensor, p: float):
        self.floor, self.p = floor, p
        self.t = torch.maximum(x, floor)  # promotes x to floor's dtype
        self.norm = torch.linalg.vector_norm(self.t, dim=-1, keepdim=True)
        self.pow_grad = self.t ** (p - 1)  # t**p = t**(p-1) t, and d(t**p)/dt = p t**(p-1)
        self.unit = self.pow_grad * self.t
        self.inv_pow_norm = 1 / torch.linalg.vector_norm(self.unit, dim=-1, keepdim=True)
        self.unit.mul_(self.inv_pow_norm)

    def backward(self, dunit: torch.Tensor, unit_scale, dt_along_t=None) -> torch.Tensor:
        """dt of unit_scale * u from dunit (consumed), plus dt_along_t * t: unit_scale a (dunit - (dunit . u) u)
        p t**(p-1) (a before any power: a cubed overflows where every channel is at the floor). dt_along_t=None:
        the map is phi = ||t|| u itself (unit_scale = ||t||), whose norm adds (dunit . u) / ||t|| along t."""
        dot = (dunit * self.unit).sum(-1, keepdim=True)
        if dt_along_t is None:
            dt_along_t = dot / self.norm
        dt = dunit.addcmul_(dot, self.unit, value=-1).mul_(self.pow_grad).mul_(unit_scale * self.inv_pow_norm * self.p)
        return dt.addcmul_(dt_along_t, self.t)

    def phi(self, dtype: torch.dtype) -> torch.Tensor:
        """phi_p(t) = ||t|| u, rounded to dtype (as the forward computed it)."""
        return torch.mul(self.unit, self.norm, out=torch.empty_like(self.unit, dtype=dtype))

    def through_max(self, dt: torch.Tensor, x_dtype: torch.dtype, floor_grad: bool):
        """Gradients of x and (if floor_grad) of floor from dt (consumed), that of t = max(x, floor)."""
        # 1 where x > floor, else 0 (t - floor is 0 exactly there), as a number: on a CPU, where() and products
        # with a boolean mask run 10-30x slower than products with a float one
        above = (self.t - self.floor).sign_()
        dfloor = torch.addcmul(dt, dt, above, value=-1).flatten(0, -2).sum(0) if floor_grad else None
        return dt.mul_(above).to(x_dtype), dfloor


def _block_diagonal_pays(q: torch.Tensor, num_heads: int) -> bool:
    """Heads as block-diagonal matmuls: on a GPU in half precision, where the tensor cores make the extra
    products of other heads' channels free and the launches of a loop over heads are what costs."""
    return num_heads > 1 and q.device.type == 'cuda' and q.dtype in (torch.float16, torch.bfloat16)


def _stacking_pays(q: torch.Tensor) -> bool:
    """Queries and keys of one size in separate buffers stacked, so that the focusing passes (of a training
    forward, and of the backward) run once over both: on a GPU, where each pass is a launch; on a CPU the copies
    into the stack cost more than the launches they save (a backward 1.4x slower)."""
    return q.device.type == 'cuda'


def _diagonal_blocks(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The heads' (d, d) diagonal blocks of a (B, C, C) view, as a (B, d, d, H) view."""
    B, C = x.shape[:2]
    return x.view(B, num_heads, C // num_heads, num_heads, C // num_heads).diagonal(dim1=1, dim2=3)


def _head_state(k_phi: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[k^T v | sum k] of all heads as one (B, C, C + H) matrix: each head's block on the diagonal, its
    normaliser in column C + h; zeros elsewhere, so (B, N, C) queries times it give every head's output."""
    B, n, C = k_phi.shape
    H = num_heads
    state = k_phi.new_zeros(B, C, C + H)
    _diagonal_blocks(state[..., :C], H).copy_(_diagonal_blocks(torch.bmm(k_phi.transpose(1, 2), v), H))
    state[..., C:].view(B, H, C // H, H).diagonal(dim1=1, dim2=3).copy_(k_phi.sum(1).view(B, H, -1).transpose(1, 2))
    return state


def _attention_backward_per_head(u, k_phi, v, eps, grad, num_heads: int):
    """Gradients of the queries u, keys k_phi (as the forward scaled them), values and (if it is a tensor) eps,
    from that of the output, one head at a time on column slices, as the forward: the matmuls read them in
    place."""
    B, N, C = u.shape
    d = C // num_heads
    du, dk_phi, dv, de = [], [], [], 0
    for i in range(num_heads):
        cols = slice(i * d, (i + 1) * d)
        u_i, k_i, v_i, grad_i = u[..., cols], k_phi[..., cols], v[..., cols], grad[..., cols]
        # the forward's [k_phi^T v | sum k_phi] and [numerator | normaliser] again
        kv = torch.cat([torch.bmm(k_i.transpose(1, 2), v_i), k_i.sum(1).unsqueeze(-1)], dim=-1)
        out = torch.bmm(u_i, kv).float()
        normaliser = out[..., d:] + eps
        # [dnumerator | dnormaliser], in v's dtype for the matmuls below
        dout = u.new_empty(B, N, d + 1)
        dout[..., :d] = grad_i / normaliser
        dnormaliser = (grad_i * out[..., :d]).sum(-1, keepdim=True).div_(normaliser.square()).neg_()
        dout[..., d:] = dnormaliser
        du.append(torch.bmm(dout, kv.transpose(1, 2)))
        dkv = torch.bmm(u_i.transpose(1, 2), dout)
        dstate, dsum = dkv[..., :d], dkv[..., d:]
        dk_phi.append(torch.baddbmm(dsum.transpose(1, 2), v_i, dstate.transpose(1, 2)))
        dv.append(torch.bmm(k_i, dstate))
        if isinstance(eps, torch.Tensor):
            de = de + dnormaliser
    du, dk_phi, dv = (x[0] if num_heads == 1 else torch.cat(x, dim=-1) for x in (du, dk_phi, dv))
    return du, dk_phi, dv, de


def _attention_backward_block_diagonal(u, k_phi, v, eps, grad, num_heads: int):
    """`_attention_backward_per_head` by block-diagonal matmuls over all heads (`_head_state`)."""
    B, N, C = u.shape
    H = num_heads
    state = _head_state(k_phi, v, H)
    out = torch.bmm(u, state).float()
    normaliser = (out[..., C:] + eps).unsqueeze(-1)
    grad_heads = grad.unflatten(-1, (H, -1))
    # [dnumerator | dnormaliser], in v's dtype for the matmuls below
    dout = u.new_empty(B, N, C + H)
    dout[..., :C] = (grad_heads / normaliser).flatten(2)
    dnormaliser = (grad_heads * out[..., :C].unflatten(-1, (H, -1))).sum(-1, keepdim=True)
    dnormaliser = dnormaliser.div_(normaliser.square()).neg_()
    dout[..., C:] = dnormaliser.flatten(2)
    du = torch.bmm(dout, state.transpose(1, 2))
    dfull = torch.bmm(u.transpose(1, 2), dout)
    dstate = torch.zeros_like(dfull[..., :C])  # other heads' products are not in the function: no gradient
    _diagonal_blocks(dstate, H).copy_(_diagonal_blocks(dfull[..., :C], H))
    dsum = dfull[..., C:].view(B, H, C // H, H).diagonal(dim1=1, dim2=3).transpose(1, 2).reshape(B, 1, C)
    dk_phi = torch.baddbmm(dsum, v, dstate.transpose(1, 2))
    dv = torch.bmm(k_phi, dstate)
    return du, dk_phi, dv, dnormaliser.sum(2) if isinstance(eps, torch.Tensor) else 0


class _FocusedLinearAttentionFn(torch.autograd.Function):
    """`focused_linear_attention` with a backward that keeps only q, k and v (views of the projections, which
    autograd keeps anyway) and recomputes the focused maps and the kv state from them: autograd through the
    forward's ops kept phi(q), phi(k), the output's numerator and float32 copies of q and k per layer."""

    @staticmethod
    def forward(ctx, q, k, v, floor, p: float, num_heads: int, residual, key_offset):
        ctx.save_for_backward(q, k, v, floor, key_offset)
        ctx.p, ctx.num_heads, ctx.has_residual = p, num_heads, residual is not None
        return focused_linear_attention(q, k, v, floor, p, num_heads, residual, key_offset)  # the no-grad path

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        q, k, v, floor_param, key_offset = ctx.saved_tensors
        floor = floor_param.to(torch.promote_types(q.dtype, torch.float32))
        keys = k if key_offset is None else k + key_offset
        floor_grad = ctx.needs_input_grad[3]
        if v.dtype == torch.float16:  # in float32, as the forward ran
            with torch.autocast(q.device.type, enabled=False):
                dq, dk, dv, dfloor = _maps_backward(q, keys, v.float(), floor, grad.float(), ctx.p, ctx.num_heads,
                                                    floor_grad)
        else:
            dq, dk, dv, dfloor = _maps_backward(q, keys, v, floor, grad, ctx.p, ctx.num_heads, floor_grad)
        dfloor = dfloor.to(floor_param.dtype) if floor_grad else None
        doffset = dk.sum_to_size(key_offset.shape) if ctx.needs_input_grad[7] else None
        return dq, dk, dv.to(v.dtype), dfloor, None, None, grad if ctx.has_residual else None, doffset


def _attention_backward(u, k_phi, v, eps, grad, num_heads: int):
    if _block_diagonal_pays(u, num_heads):
        return _attention_backward_block_diagonal(u, k_phi, v, eps, grad, num_heads)
    return _attention_backward_per_head(u, k_phi, v, eps, grad, num_heads)


def _maps_backward(q, keys, v, floor, grad, p: float, num_heads: int, floor_grad: bool):
    """Gradients of q, keys (k + key_offset), v and floor, as the forward computed them: phi(q) and phi(k) exactly, the normaliser's 1e-6 as n * 1e-6. On a GPU, queries and keys of one size are stacked, so
    that every pass of the focusing maps and their backward runs once over both."""
    n = keys.shape[1]
    if q.shape == keys.shape and _stacking_pays(q):
        maps = _FocusingKernel(torch.stack([q, keys], dim=2), floor, p)  # (B, N, 2, C)
        q_phi, k_phi = maps.phi(v.dtype).unbind(2)
        du, dk_phi, dv, _ = _attention_backward(q_phi, k_phi, v, n * 1e-6, grad, num_heads)
        dphi = torch.stack([du, dk_phi], dim=2).float()
        dx, dfloor = maps.through_max(maps.backward(dphi, maps.norm), q.dtype, floor_grad)
        dq, dk = dx.unbind(2)
        return dq, dk, dv, dfloor
    queries, keys = _FocusingKernel(q, floor, p), _FocusingKernel(keys, floor, p)
    du, dk_phi, dv, _ = _attention_backward(queries.phi(v.dtype), keys.phi(v.dtype), v, n * 1e-6, grad, num_heads)
    dq, dfloor_q = queries.through_max(queries.backward(du.float(), queries.norm), q.dtype, floor_grad)
    dk, dfloor_k = keys.through_max(keys.backward(dk_phi.float(), keys.norm), q.dtype, floor_grad)
    return dq, dk, dv, dfloor_q + dfloor_k if floor_grad else None


_BATCHED_HEADS_MAX_TOKENS = 4096  # batch x tokens up to which all heads go through one matmul


def _attend_block_diagonal(q_phi, k_phi, v, eps, num_heads: int, residual, overwrite_inputs: bool) -> torch.Tensor:
    """Every head's attention by two matmuls over all C channels (`_head_state`): a fixed number of ops and no
    copies of the heads, where a loop over heads launches six ops per head."""
    C, H = q_phi.shape[-1], num_heads
    out = torch.bmm(q_phi, _head_state(k_phi, v, H))
    numerator, normaliser = out[..., :C].unflatten(-1, (H, -1)), (out[..., C:] + eps).unsqueeze(-1)
    if residual is None:
        return (numerator / normaliser).flatten(2).to(v.dtype)
    heads = residual.unflatten(-1, (H, -1))
    out = heads.addcdiv_(numerator, normaliser) if overwrite_inputs else torch.addcdiv(heads, numerator, normaliser)
    return out.flatten(2).to(v.dtype)


def focused_linear_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        floor: torch.Tensor,
        focusing_factor: float,
        num_heads: int,
        residual: Optional[torch.Tensor] = None,
        key_offset: Optional[torch.Tensor] = None,
        overwrite_inputs: bool = False,
) -> torch.Tensor:
    """Focused linear attention in few passes over memory, on (B, N, C) tokens of any strides.

    q: (B, N, C) and k: (B, n, C) enter already shifted and divided by the kernel's scale,
    q = (q_proj + 1e-6) / s, so that the kernel (relu(q_proj) + 1e-6) / s is max(q, floor) with
    floor = 1e-6 / s of shape (C,): the module folds 1 / s and the shift into its projection.
    v: (B, n, C). residual (B, N, C), added to the output (the depthwise conv of V). key_offset, broadcastable
    to k (the key positional encoding), is added to k first: with autograd, k + key_offset is recomputed in
    backward rather than kept.
    Returns (B, N, C) in v's dtype, equal to `linear_attention(focusing_map(.), focusing_map(.), v)`:
    - the kernel max(q, floor), its power and both norms are a few passes, over q and k at once when they are
      the two halves of one projection's output;
    - the normaliser phi(q) . sum(phi(k)) is one more column of the matmul that gives the numerator.
    overwrite_inputs: without autograd, q, k and residual may be used as scratch space (the module passes
    its own projections): no new buffers, which on a CPU also spares their first-touch page faults.
    """
    exporting = is_exporting()
    if torch.is_grad_enabled() and not exporting and any(
            t is not None and t.requires_grad for t in (q, k, v, floor, residual, key_offset)):
        # backward recomputes the focused maps from q and k instead of keeping them
        return _FocusedLinearAttentionFn.apply(q, k, v, floor, focusing_factor, num_heads, residual, key_offset)
    if v.dtype == torch.float16:
        # fp16's range holds neither the kv state's sums nor the quotients' gradients at small head dims: the
        # attention runs in float32, autocast off (it would round the matmuls back to fp16), and only its output
        # is rounded to fp16
        with torch.autocast(q.device.type, enabled=False):
            return _attention_without_autograd(q, k, v.float(), floor, focusing_factor, num_heads, residual,
                                               key_offset, overwrite_inputs, exporting, out_dtype=torch.float16)
    return _attention_without_autograd(q, k, v, floor, focusing_factor, num_heads, residual, key_offset,
                                       overwrite_inputs, exporting, out_dtype=v.dtype)


def _attention_without_autograd(q, k, v, floor, focusing_factor: float, num_heads: int, residual, key_offset,
                                overwrite_inputs: bool, exporting: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """`focused_linear_attention` with no graph to record, in v's dtype; the output rounded to out_dtype."""
    B, N, C = q.shape
    n = k.shape[1]
    d = C // num_heads
    floor = floor.to(torch.promote_types(q.dtype, torch.float32))
    # without autograd, powers and scalings overwrite their input: fewer allocations, fewer page faults
    # (not in an exported graph, whose runtime plans its own buffers)
    in_place = not torch.is_grad_enabled() and not exporting
    overwrite_inputs = overwrite_inputs and in_place
    if key_offset is not None:
        k = k.add_(key_offset) if overwrite_inputs else k + key_offset

    p, dtype = focusing_factor, v.dtype
    # phi(q) and phi(k) exactly, and the 1 / n of the spec's k^T v / n and mean(phi(k)) cancels between
    # numerator and normaliser but for the normaliser's 1e-6, which becomes n * 1e-6
    eps = n * 1e-6
    qk = None if exporting or torch.compiler.is_compiling() else _adjacent_halves(q, k)
    if qk is None and q.shape == k.shape and q.dtype == k.dtype and _stacking_pays(q) and not exporting:
        qk = torch.stack([q, k], dim=2)  # on a GPU one copy costs less than the launches it saves
    if qk is not None:  # the halves of one projection, or stacked: both maps in the same passes
        q_phi, k_phi = _focused(qk, floor, p, dtype, in_place, overwrite_inputs).unbind(2)
    else:
        q_phi = _focused(q, floor, p, dtype, in_place, overwrite_inputs)
        k_phi = _focused(k, floor, p, dtype, in_place, overwrite_inputs)
    if not exporting and _block_diagonal_pays(q, num_heads):
        return _attend_block_diagonal(q_phi, k_phi, v, eps, num_heads, residual, overwrite_inputs).to(out_dtype)
    if exporting or (num_heads > 1 and B * N <= _BATCHED_HEADS_MAX_TOKENS):
        # few tokens: one matmul over all heads beats a Python loop of small ops (the copies are small);
        # an exported graph takes this path at every size (B and N are symbols there)
        k_heads = k_phi.reshape(B, n, num_heads, d).transpose(1, 2)
        kv = torch.matmul(k_heads.transpose(-2, -1), v.reshape(B, n, num_heads, d).transpose(1, 2))
        kv = torch.cat([kv, k_heads.sum(dim=-2).unsqueeze(-1)], dim=-1)
        out = torch.matmul(q_phi.reshape(B, N, num_heads, d).transpose(1, 2), kv)
        out = (out[..., :d] / (out[..., d:] + eps)).transpose(1, 2).reshape(B, N, C)
        if residual is not None:
            out = residual.add_(out) if overwrite_inputs else out + residual
        return out.to(out_dtype)
    heads = []
    # one head at a time on strided column slices: matmuls read them in place, no per-head copies
    for i in range(num_heads):
        cols = slice(i * d, (i + 1) * d)
        k_i = k_phi[..., cols]
        # [k^T v | sum(k)]: the normaliser is one more column of the numerator's matmul
        kv = torch.cat([torch.bmm(k_i.transpose(1, 2), v[..., cols]), k_i.sum(dim=1).unsqueeze(-1)], dim=-1)
        out = torch.bmm(q_phi[..., cols], kv)
        numerator, normaliser = out[..., :d], out[..., d:] + eps
        if residual is None:
            heads.append(numerator / normaliser)
        elif overwrite_inputs:
            heads.append(residual[..., cols].addcdiv_(numerator, normaliser))
        else:
            heads.append(torch.addcdiv(residual[..., cols], numerator, normaliser))
    if overwrite_inputs and residual is not None:
        return residual.to(out_dtype)  # every head was written into its columns
    out = heads[0] if num_heads == 1 else torch.cat(heads, dim=-1)
    return out.to(out_dtype)


def _fused_kernels(*args) -> torch.Tensor:
    if not triton_available(args[0].device):
        raise RuntimeError(f'Triton is not installed or does not run on {args[0].device.type} '
                           f'(on a CPU it needs TRITON_INTERPRET=1)')
    from .fla_triton import triton_focused_linear_attention
    return triton_focused_linear_attention(*args)


_IMPLEMENTATIONS = {'torch': focused_linear_attention, 'triton': _fused_kernels}


def run_focused_linear_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        floor: torch.Tensor,
        focusing_factor: float,
        num_heads: int,
        residual: Optional[torch.Tensor] = None,
        key_offset: Optional[torch.Tensor] = None,
        attn_impl: str = 'auto',
        overwrite_inputs: bool = False,
) -> torch.Tensor:
    """`focused_linear_attention` by the implementation `attn_impl` selects ('auto', 'torch' or 'triton')."""
    args = (q, k, v, floor, focusing_factor, num_heads, residual, key_offset)
    if attn_impl == 'torch' or is_exporting() or (attn_impl == 'auto' and (
            q.device.type != 'cuda' or torch.compiler.is_compiling() or not triton_available(q.device))):
        return focused_linear_attention(*args, overwrite_inputs=overwrite_inputs)
    if attn_impl == 'triton':
        return SELECTOR.call('triton', _IMPLEMENTATIONS, args)
    return SELECTOR.run(selection_key(args), _IMPLEMENTATIONS, args)


_KERNEL_SHIFT = 1e-6  # the kernel is (relu(x) + 1e-6) / s


def _projection_dtype(x: torch.Tensor, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype a linear layer computes in on x's device: autocast's when it is on, else the parameters'."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return param_dtype


_WeightBias = Tuple[torch.Tensor, Optional[torch.Tensor]]


def _fold_kernel_into(linear: nn.Linear, inv_scale: torch.Tensor, num_kernel_parts: int, dtype: torch.dtype
                      ) -> Tuple[_WeightBias, Optional[_WeightBias]]:
    """(weight, bias) of the first num_kernel_parts C-wide outputs of `linear` (q and/or k) shifted and divided
    by the scale, and (weight, bias) of its other outputs (v) as they are (None if it has none), all in `dtype`.

    (W x + b + 1e-6) / s is one matmul with the rows of W and b scaled: no pass over the tokens is added. The
    other rows are left alone (a training step computes this on every call: few ops, none over v's rows).
    """
    C = inv_scale.shape[0]
    rows = (num_kernel_parts * C, linear.out_features - num_kernel_parts * C)
    # split, not sliced: in a training step one backward op joins the parts' gradients
    weight, rest_weight = linear.weight.split(rows)
    bias, rest_bias = (None, None) if linear.bias is None else linear.bias.split(rows)
    weight = (weight.unflatten(0, (num_kernel_parts, C)) * inv_scale.unsqueeze(-1)).flatten(0, 1)
    shift = _KERNEL_SHIFT if bias is None else bias.unflatten(0, (num_kernel_parts, C)) + _KERNEL_SHIFT
    bias = (shift * inv_scale).expand(num_kernel_parts, C).flatten()
    rest = None
    if rows[1]:
        rest = (rest_weight.to(dtype), None if rest_bias is None else rest_bias.to(dtype))
    return (weight.to(dtype), bias.to(dtype)), rest


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
        self._resize_pe = GridTableResizer(self.key_grid_size)
        self._folded = ParameterCache()
        resolve_attn_impl(attn_impl, env_override='')  # fail early on a typo
        self.attn_impl = attn_impl

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, num_heads={self.num_heads}, focusing_factor={self.focusing_factor}, '
                f'key_grid_size={self.key_grid_size}')

    def key_positional_encoding(self, key_size: Tuple[int, int]) -> torch.Tensor:
        """The key positional encoding resized to the actual key grid (cached for inference)."""
        return self._resize_pe(self.positional_encoding, key_size)

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
        self._resize_pe.clear()
        self._folded.clear()
        return super()._apply(fn, *args, **kwargs)

    def folded_parameters(self, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, tuple, tuple]:
        """What the fast paths compute from the parameters: the kernel's 1 / s and floor 1e-6 / s (in the
        parameters' dtype), the (weight, bias) pairs of the projections with 1 / s and the shift folded in (q and
        k's then v's of a fused qkv, else q's then kv's) and `local_mixing_kernel()`, both in `dtype` (the
        projections' compute dtype). Kept between inference calls while the parameters stay the same."""
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
            weight, bias, padding = self.local_mixing_kernel()
            kernel = (weight.to(dtype), bias.to(dtype) if bias is not None else None, padding)
            return inv_scale, inv_scale * _KERNEL_SHIFT, projections, kernel
        return self._folded.get(dtype, self.parameters(), fold)

    def _scaled_key_encoding(self, key_size: Tuple[int, int], inv_scale: torch.Tensor, dtype: torch.dtype):
        """The key positional encoding at key_size, divided by the kernel's scale, in `dtype`."""
        def scale():
            return (self.key_positional_encoding(key_size) * inv_scale).to(dtype)
        if not ParameterCache.active():  # and the key size may be a symbol
            return scale()
        return self._folded.get((int(key_size[0]), int(key_size[1]), dtype), (self.positional_encoding, self.scale),
                                scale)

    def forward(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        impl = resolve_attn_impl(self.attn_impl)
        if impl == 'reference':
            q, k, v, key_size = self.project(x, feat_size)
            return self.proj_drop(self.proj(self.attend(q, k, v, feat_size, key_size)))
        # the kernel's 1 / s and its 1e-6 shift ride in the q and k projections (the matmuls' own bias add),
        # so the focusing map starts with one max() instead of relu, add and divide
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
        # q, k and the residual are this call's own buffers: without autograd they double as scratch space
        # (not under torch.compile, whose inductor plans its own buffers)
        scratch = not torch.is_grad_enabled() and not torch.compiler.is_compiling() and not is_exporting()
        pe = self._scaled_key_encoding(key_size, inv_scale, k.dtype)
        residual = self.local_mixing(v, feat_size, mixing_kernel)
        x = run_focused_linear_attention(q, k, v, floor, self.focusing_factor, self.num_heads, residual=residual,
                                         key_offset=pe, attn_impl=impl, overwrite_inputs=scratch)
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
