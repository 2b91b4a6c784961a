""" Fused Triton kernels for focused linear attention, forward and backward.

The same function as the torch ops of torch_inference.py and torch_training.py, in five passes over memory
(three with one head):

- `_kernel_stats`: per token, over all C channels, ||t|| and 1 / ||t**p|| of the kernel t = max(x, floor)
  (for q and for k; the focusing map's norms span every head, so they are computed once per token; with
  one head every tile below holds whole rows and computes them itself);
- `_kv_state`: per (batch, head) and chunk of keys, [phi(k)^T v / n | sum phi(k) / n] in float32;
- `_attn_out`: per (batch, head) and block of queries, u = t**p / ||t**p|| (unit norm: no fp16 overflow),
  out = u S / (u . z + 1e-6 / ||t||) + residual, written at the head's columns of (B, N, C);
- backward: `_attn_out_bwd` (du, the normaliser's gradient, partial dS and dz), `_kv_state_bwd`
  (dphi(k), dv) and `_kernel_bwd` (through the focusing map and the max() back to q, k and the floor).

Inputs are (B, N, C) tokens with unit channel stride and any batch / token strides (e.g. chunks of a
fused qkv projection), in float32, bfloat16 or float16; every accumulation is float32. A key offset (the key
positional encoding, broadcast over the batch) is added to k as the kernels load it: no pass of its own, and
nothing but k kept for backward.
Runs on CUDA, and on the CPU under TRITON_INTERPRET=1 (how the tests check it without a GPU).
"""
import functools
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

__all__ = ['triton_focused_linear_attention']

_INTERPRETED = os.environ.get('TRITON_INTERPRET') == '1'


@triton.jit
def _power(t, P: tl.constexpr):
    if P == 3:
        return t * t * t
    elif P == 2:
        return t * t
    else:  # t >= floor > 0
        return tl.exp2(P * tl.log2(t))


@triton.jit
def _power_grad(t, P: tl.constexpr):
    """d(t**p)/dt."""
    if P == 3:
        return 3 * t * t
    elif P == 2:
        return 2 * t
    else:
        return P * tl.exp2((P - 1) * tl.log2(t))


@triton.jit
def _row_stats(t, mask, r_mask, P: tl.constexpr):
    """t**p (0 outside the mask), ||t|| and 1 / ||t**p|| over the rows of a tile that holds whole rows."""
    t_pow = tl.where(mask, _power(t, P), 0.)
    t = tl.where(mask, t, 0.)
    pow_norm = tl.sqrt(tl.where(r_mask, tl.sum(t_pow * t_pow, axis=1), 1.))
    return t_pow, tl.sqrt(tl.sum(t * t, axis=1)), 1 / pow_norm


@triton.jit
def _load_tokens(x_ptr, off_ptr, x_rows, off_rows, cols, mask, HAS_OFFSET: tl.constexpr):
    """A tile of q or k in float32 (1 outside the mask: no log of 0), plus the key offset when HAS_OFFSET, the
    sum rounded to x's dtype as k + offset is in torch. x_rows, off_rows: each row's offset in elements."""
    x = tl.load(x_ptr + x_rows[:, None] + cols[None, :], mask=mask, other=1.)
    if HAS_OFFSET:
        offset = tl.load(off_ptr + off_rows[:, None] + cols[None, :], mask=mask, other=0.)
        x = (x.to(tl.float32) + offset.to(tl.float32)).to(x.dtype)
    return x.to(tl.float32)


@triton.jit
def _kernel_stats(x_ptr, off_ptr, floor_ptr, norm_ptr, inv_pow_norm_ptr, rows, N, C, stride_b, stride_n,
                  stride_ob, stride_on, P: tl.constexpr, HAS_OFFSET: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_C: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    r_mask, c_mask = r < rows, c < C
    mask = r_mask[:, None] & c_mask[None, :]
    b, i = r // N, r % N
    x = _load_tokens(x_ptr, off_ptr, b * stride_b + i * stride_n, b * stride_ob + i * stride_on, c, mask, HAS_OFFSET)
    floor = tl.load(floor_ptr + c, mask=c_mask, other=1.)
    t = tl.maximum(x, floor[None, :])
    _, norm, inv_pow_norm = _row_stats(t, mask, r_mask, P)
    tl.store(norm_ptr + r, norm, mask=r_mask)
    tl.store(inv_pow_norm_ptr + r, inv_pow_norm, mask=r_mask)


@triton.jit
def _load_phi_k(k_ptr, off_ptr, floor, norm_ptr, inv_pow_norm_ptr, b, j, j_mask, cols, d_mask, n, stride_b, stride_n,
                stride_ob, stride_on, inv_n, P: tl.constexpr, HAS_OFFSET: tl.constexpr, ROW_STATS: tl.constexpr):
    """phi(k) / n for a (BLOCK_N, BLOCK_D) tile of one head, zero outside the masks. ROW_STATS: the head is the
    whole row (one head), so the tile's own norms are the token's, computed here and stored for backward."""
    mask = j_mask[:, None] & d_mask[None, :]
    k = _load_tokens(k_ptr, off_ptr, b * stride_b + j * stride_n, b * stride_ob + j * stride_on, cols, mask,
                     HAS_OFFSET)
    t = tl.maximum(k, floor[None, :])
    if ROW_STATS:
        t_pow, norm, inv_pow_norm = _row_stats(t, mask, j_mask, P)
        tl.store(norm_ptr + b * n + j, norm, mask=j_mask)
        tl.store(inv_pow_norm_ptr + b * n + j, inv_pow_norm, mask=j_mask)
        return t_pow * (norm * inv_pow_norm * inv_n)[:, None]
    scale = tl.load(norm_ptr + b * n + j, mask=j_mask, other=0.) * tl.load(
        inv_pow_norm_ptr + b * n + j, mask=j_mask, other=0.) * inv_n
    return tl.where(mask, _power(t, P) * scale[:, None], 0.)


@triton.jit
def _kv_state(k_ptr, off_ptr, v_ptr, floor_ptr, norm_ptr, inv_pow_norm_ptr, state_ptr, n, H, D, chunk, inv_n,
              stride_kb, stride_kn, stride_ob, stride_on, stride_vb, stride_vn, stride_s0, stride_s1,
              P: tl.constexpr, HAS_OFFSET: tl.constexpr, IEEE: tl.constexpr, ROW_STATS: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh, split = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    d = tl.arange(0, BLOCK_D)
    d_mask = d < D
    cols = h * D + d
    floor = tl.load(floor_ptr + cols, mask=d_mask, other=1.)
    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    z = tl.zeros((BLOCK_D,), dtype=tl.float32)
    start = split * chunk
    end = tl.minimum(start + chunk, n)
    for j0 in range(start, end, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        j_mask = j < end
        phi = _load_phi_k(k_ptr, off_ptr, floor, norm_ptr, inv_pow_norm_ptr, b, j, j_mask, cols, d_mask, n,
                          stride_kb, stride_kn, stride_ob, stride_on, inv_n, P, HAS_OFFSET, ROW_STATS)
        v = tl.load(v_ptr + b * stride_vb + j[:, None] * stride_vn + cols[None, :],
                    mask=j_mask[:, None] & d_mask[None, :], other=0.)
        if IEEE:
            acc += tl.dot(tl.trans(phi), v.to(tl.float32), input_precision='ieee')
        else:
            acc += tl.dot(tl.trans(phi).to(v.dtype), v)
        z += tl.sum(phi, axis=0)
    base = state_ptr + bh * stride_s0 + split * stride_s1
    mask = d_mask[:, None] & d_mask[None, :]
    tl.store(base + d[:, None] * (D + 1) + d[None, :], acc, mask=mask)
    tl.store(base + d * (D + 1) + D, z, mask=d_mask)


@triton.jit
def _load_state(state_ptr, bh, d, d_mask, D):
    base = state_ptr + bh * D * (D + 1)
    S = tl.load(base + d[:, None] * (D + 1) + d[None, :], mask=d_mask[:, None] & d_mask[None, :], other=0.)
    z = tl.load(base + d * (D + 1) + D, mask=d_mask, other=0.)
    return S, z


@triton.jit
def _load_unit_q(q_ptr, floor, norm_ptr, inv_pow_norm_ptr, b, i, i_mask, cols, d_mask, N, stride_b, stride_n,
                 P: tl.constexpr, ROW_STATS: tl.constexpr):
    """u = t**p / ||t**p|| for a (BLOCK_M, BLOCK_D) tile of one head, and the normaliser's 1e-6 / ||t||.
    ROW_STATS: as in `_load_phi_k`."""
    mask = i_mask[:, None] & d_mask[None, :]
    q = tl.load(q_ptr + b * stride_b + i[:, None] * stride_n + cols[None, :], mask=mask, other=1.)
    t = tl.maximum(q.to(tl.float32), floor[None, :])
    if ROW_STATS:
        t_pow, norm, inv_pow_norm = _row_stats(t, mask, i_mask, P)
        tl.store(norm_ptr + b * N + i, norm, mask=i_mask)
        tl.store(inv_pow_norm_ptr + b * N + i, inv_pow_norm, mask=i_mask)
        return t_pow * inv_pow_norm[:, None], 1e-6 / tl.where(i_mask, norm, 1.)
    inv_pow_norm = tl.load(inv_pow_norm_ptr + b * N + i, mask=i_mask, other=0.)
    eps = 1e-6 / tl.load(norm_ptr + b * N + i, mask=i_mask, other=1.)
    return tl.where(mask, _power(t, P) * inv_pow_norm[:, None], 0.), eps


@triton.jit
def _attn_out(q_ptr, floor_ptr, norm_ptr, inv_pow_norm_ptr, state_ptr, res_ptr, out_ptr, N, H, D,
              stride_qb, stride_qn, stride_rb, stride_rn, stride_ob, stride_on,
              P: tl.constexpr, HAS_RES: tl.constexpr, IEEE: tl.constexpr, ROW_STATS: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    i_mask, d_mask = i < N, d < D
    cols = h * D + d
    floor = tl.load(floor_ptr + cols, mask=d_mask, other=1.)
    u, eps = _load_unit_q(q_ptr, floor, norm_ptr, inv_pow_norm_ptr, b, i, i_mask, cols, d_mask, N,
                             stride_qb, stride_qn, P, ROW_STATS)
    S, z = _load_state(state_ptr, bh, d, d_mask, D)
    if IEEE:
        num = tl.dot(u, S, input_precision='ieee')
    else:
        num = tl.dot(u.to(out_ptr.dtype.element_ty), S.to(out_ptr.dtype.element_ty))
    out = num / (tl.sum(u * z[None, :], axis=1) + eps)[:, None]
    mask = i_mask[:, None] & d_mask[None, :]
    if HAS_RES:
        out += tl.load(res_ptr + b * stride_rb + i[:, None] * stride_rn + cols[None, :], mask=mask,
                       other=0.).to(tl.float32)
    tl.store(out_ptr + b * stride_ob + i[:, None] * stride_on + cols[None, :], out, mask=mask)


@triton.jit
def _attn_out_bwd(q_ptr, floor_ptr, norm_ptr, inv_pow_norm_ptr, state_ptr, grad_ptr, du_ptr, dden_ptr,
                  dstate_ptr, N, H, D, stride_qb, stride_qn, stride_gb, stride_gn, stride_ds0, stride_ds1,
                  P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    block, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    i = block * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    i_mask, d_mask = i < N, d < D
    mask = i_mask[:, None] & d_mask[None, :]
    cols = h * D + d
    floor = tl.load(floor_ptr + cols, mask=d_mask, other=1.)
    u, eps = _load_unit_q(q_ptr, floor, norm_ptr, inv_pow_norm_ptr, b, i, i_mask, cols, d_mask, N,
                             stride_qb, stride_qn, P, False)
    S, z = _load_state(state_ptr, bh, d, d_mask, D)
    g = tl.load(grad_ptr + b * stride_gb + i[:, None] * stride_gn + cols[None, :], mask=mask, other=0.).to(
        tl.float32)
    den = tl.sum(u * z[None, :], axis=1) + eps
    num = tl.dot(u, S, input_precision='ieee')
    dnum = g / den[:, None]
    dden = -tl.sum(dnum * num, axis=1) / den
    du = tl.dot(dnum, tl.trans(S), input_precision='ieee') + dden[:, None] * z[None, :]
    tl.store(du_ptr + (b * N + i[:, None]) * (H * D) + cols[None, :], du, mask=mask)
    tl.store(dden_ptr + (b * N + i) * H + h, dden, mask=i_mask)
    base = dstate_ptr + bh * stride_ds0 + block * stride_ds1
    tl.store(base + d[:, None] * (D + 1) + d[None, :], tl.dot(tl.trans(u), dnum, input_precision='ieee'),
             mask=d_mask[:, None] & d_mask[None, :])
    tl.store(base + d * (D + 1) + D, tl.sum(u * dden[:, None], axis=0), mask=d_mask)


@triton.jit
def _kv_state_bwd(k_ptr, off_ptr, v_ptr, floor_ptr, norm_ptr, inv_pow_norm_ptr, dstate_ptr, dphi_ptr, dv_ptr, n, H,
                  D, inv_n, stride_kb, stride_kn, stride_ob, stride_on, stride_vb, stride_vn,
                  P: tl.constexpr, HAS_OFFSET: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    j = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    j_mask, d_mask = j < n, d < D
    mask = j_mask[:, None] & d_mask[None, :]
    cols = h * D + d
    floor = tl.load(floor_ptr + cols, mask=d_mask, other=1.)
    phi = _load_phi_k(k_ptr, off_ptr, floor, norm_ptr, inv_pow_norm_ptr, b, j, j_mask, cols, d_mask, n,
                      stride_kb, stride_kn, stride_ob, stride_on, inv_n, P, HAS_OFFSET, False)
    v = tl.load(v_ptr + b * stride_vb + j[:, None] * stride_vn + cols[None, :], mask=mask, other=0.).to(tl.float32)
    dS, dz = _load_state(dstate_ptr, bh, d, d_mask, D)
    # S = phi^T v and z = sum(phi): dphi = v dS^T + dz, dv = phi dS
    dphi = tl.dot(v, tl.trans(dS), input_precision='ieee') + dz[None, :]
    dv = tl.dot(phi, dS, input_precision='ieee')
    tl.store(dphi_ptr + (b * n + j[:, None]) * (H * D) + cols[None, :], dphi, mask=mask)
    tl.store(dv_ptr + (b * n + j[:, None]) * (H * D) + cols[None, :], dv, mask=mask)


@triton.jit
def _kernel_bwd(x_ptr, off_ptr, floor_ptr, norm_ptr, inv_pow_norm_ptr, dy_ptr, dden_ptr, dx_ptr, dfloor_ptr,
                rows, N, C, H, inv_n, stride_b, stride_n, stride_ob, stride_on,
                P: tl.constexpr, IS_QUERY: tl.constexpr, HAS_OFFSET: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
    """Through the focusing map and max(x, floor), a block of full rows (every head: the norms span C).

    Queries: y = u = t**p / ||t**p|| and the normaliser's e = 1e-6 / ||t|| (its gradient summed over heads).
    Keys: y = phi / n = t**p ||t|| / (||t**p|| n).
    """
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    r_mask, c_mask = r < rows, c < C
    mask = r_mask[:, None] & c_mask[None, :]
    b, i = r // N, r % N
    x = _load_tokens(x_ptr, off_ptr, b * stride_b + i * stride_n, b * stride_ob + i * stride_on, c, mask, HAS_OFFSET)
    floor = tl.load(floor_ptr + c, mask=c_mask, other=1.)
    t = tl.maximum(x, floor[None, :])
    t_pow = tl.where(mask, _power(t, P), 0.)
    norm = tl.load(norm_ptr + r, mask=r_mask, other=1.)
    a = tl.load(inv_pow_norm_ptr + r, mask=r_mask, other=0.)
    dy = tl.load(dy_ptr + r[:, None] * C + c[None, :], mask=mask, other=0.)
    u = t_pow * a[:, None]  # t**p / ||t**p||
    dy_dot_u = tl.sum(dy * u, axis=1)
    # a alone, never a**3: where every channel is at the floor, a**3 overflows float32
    if IS_QUERY:
        # u = P a with a = ||P||^-1: dP = a (dy - (dy . u) u);  e = 1e-6 / ||t||: dt = -e / ||t||^2 t de
        h = tl.arange(0, BLOCK_H)
        dden = tl.sum(tl.load(dden_ptr + r[:, None] * H + h[None, :], mask=r_mask[:, None] & (h < H)[None, :],
                              other=0.), axis=1)
        d_pow = a[:, None] * (dy - dy_dot_u[:, None] * u)
        dt = d_pow * _power_grad(t, P) - (1e-6 / norm * dden / (norm * norm))[:, None] * t
    else:
        # y = u ||t|| / n: dP = ||t|| a / n (dy - (dy . u) u), and through ||t||: (dy . u) / n t / ||t||
        d_pow = (norm * a * inv_n)[:, None] * (dy - dy_dot_u[:, None] * u)
        dt = d_pow * _power_grad(t, P) + (dy_dot_u * inv_n / norm)[:, None] * t
    dt = tl.where(mask, dt, 0.)
    above = x > floor[None, :]
    tl.store(dx_ptr + r[:, None] * C + c[None, :], tl.where(above, dt, 0.), mask=mask)
    tl.store(dfloor_ptr + tl.program_id(0) * C + c, tl.sum(tl.where(above, 0., dt), axis=0), mask=c_mask)


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _offset_args(x: torch.Tensor, offset: Optional[torch.Tensor]) -> tuple:
    """The kernels' offset arguments: the (expanded) offset and its batch and token strides, or x itself (never
    read) when there is none."""
    offset = x if offset is None else offset
    return offset, offset.stride(0), offset.stride(1)


def _kernel_statistics(x: torch.Tensor, floor: torch.Tensor, p: float, offset: Optional[torch.Tensor] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    B, N, C = x.shape
    norm = torch.empty(B * N, device=x.device, dtype=torch.float32)
    inv_pow_norm = torch.empty_like(norm)
    block_c = triton.next_power_of_2(C)
    block_r = max(1, min(64, 4096 // block_c))
    offset_ptr, stride_ob, stride_on = _offset_args(x, offset)
    _kernel_stats[(triton.cdiv(B * N, block_r),)](
        x, offset_ptr, floor, norm, inv_pow_norm, B * N, N, C, x.stride(0), x.stride(1), stride_ob, stride_on, P=p,
        HAS_OFFSET=offset is not None, BLOCK_R=block_r, BLOCK_C=block_c)
    return norm, inv_pow_norm


def _kernel_backward(x, floor, norm, inv_pow_norm, dy, dden, p, is_query, num_heads, inv_n, offset=None):
    B, N, C = x.shape
    dx = torch.empty(B, N, C, device=x.device, dtype=torch.float32)
    block_c = triton.next_power_of_2(C)
    block_r = max(1, min(32, 2048 // block_c))
    grid = triton.cdiv(B * N, block_r)
    dfloor = torch.empty(grid, C, device=x.device, dtype=torch.float32)
    offset_ptr, stride_ob, stride_on = _offset_args(x, offset)
    _kernel_bwd[(grid,)](
        x, offset_ptr, floor, norm, inv_pow_norm, dy, dden if dden is not None else dy, dx, dfloor, B * N, N, C,
        num_heads, inv_n, x.stride(0), x.stride(1), stride_ob, stride_on, P=p, IS_QUERY=is_query,
        HAS_OFFSET=offset is not None, BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_H=triton.next_power_of_2(num_heads))
    return dx.to(x.dtype), dfloor.sum(0)


@functools.lru_cache(maxsize=None)
def _target_programs(device: torch.device) -> int:
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == 'cuda' else 4


def _kv_chunk(n: int, programs: int, block_n: int, device: torch.device) -> int:
    """Keys per program of the kv reduction: enough programs to fill the GPU, whole blocks each."""
    target = _target_programs(device)
    splits = max(1, min(triton.cdiv(n, block_n), target // max(programs, 1)))
    return triton.cdiv(triton.cdiv(n, splits), block_n) * block_n


class TritonAttentionFn(torch.autograd.Function):
    """The kernels' forward, keeping q, k, v, the token norms and the kv state for their backward."""

    @staticmethod
    def forward(ctx, q, k, v, floor, focusing_factor, num_heads, residual, key_offset):
        B, N, C = q.shape
        n = k.shape[1]
        D = C // num_heads
        block_d, block_n, block_m = _block_d(D), 32, 64
        floor = floor.float().contiguous()
        # k + key_offset is formed in the kernels' loads (and again in backward's), never stored
        offset = key_offset.expand_as(k) if key_offset is not None else None
        offset_ptr, stride_ob, stride_on = _offset_args(k, offset)
        # float32 dots in IEEE precision (not tf32), and under Triton's CPU interpreter for bfloat16 too, whose
        # bfloat16 tl.dot returns garbage there (numpy has no bfloat16); on a GPU bf16/fp16 use the tensor cores
        ieee = v.dtype == torch.float32 or (v.dtype == torch.bfloat16 and _INTERPRETED)
        # one head: each tile holds whole rows, so the kernels below compute the per-token norms themselves
        row_stats = num_heads == 1
        if row_stats:
            q_norm, q_inv_pow_norm, k_norm, k_inv_pow_norm = (
                torch.empty(B * m, device=q.device, dtype=torch.float32) for m in (N, N, n, n))
        else:
            q_norm, q_inv_pow_norm = _kernel_statistics(q, floor, focusing_factor)
            k_norm, k_inv_pow_norm = _kernel_statistics(k, floor, focusing_factor, offset)
        chunk = _kv_chunk(n, B * num_heads, block_n, q.device)
        splits = triton.cdiv(n, chunk)
        partial = torch.empty(B * num_heads, splits, D, D + 1, device=q.device, dtype=torch.float32)
        _kv_state[(B * num_heads, splits)](
            k, offset_ptr, v, floor, k_norm, k_inv_pow_norm, partial, n, num_heads, D, chunk, 1 / n,
            k.stride(0), k.stride(1), stride_ob, stride_on, v.stride(0), v.stride(1), partial.stride(0),
            partial.stride(1), P=focusing_factor, HAS_OFFSET=offset is not None, IEEE=ieee, ROW_STATS=row_stats,
            BLOCK_N=block_n, BLOCK_D=block_d)
        state = partial.sum(1) if splits > 1 else partial[:, 0].contiguous()
        out = torch.empty(B, N, C, device=q.device, dtype=v.dtype)
        res = residual if residual is not None else out
        _attn_out[(triton.cdiv(N, block_m), B * num_heads)](
            q, floor, q_norm, q_inv_pow_norm, state, res, out, N, num_heads, D,
            q.stride(0), q.stride(1), res.stride(0), res.stride(1), out.stride(0), out.stride(1),
            P=focusing_factor, HAS_RES=residual is not None, IEEE=ieee, ROW_STATS=row_stats, BLOCK_M=block_m,
            BLOCK_D=block_d)
        ctx.save_for_backward(q, k, v, floor, key_offset, q_norm, q_inv_pow_norm, k_norm, k_inv_pow_norm, state)
        ctx.focusing_factor, ctx.num_heads, ctx.has_residual = focusing_factor, num_heads, residual is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad if grad.stride(-1) == 1 else grad.contiguous()
        q, k, v, floor, key_offset, q_norm, q_inv_pow_norm, k_norm, k_inv_pow_norm, state = ctx.saved_tensors
        p, H = ctx.focusing_factor, ctx.num_heads
        offset = key_offset.expand_as(k) if key_offset is not None else None
        offset_ptr, stride_ob, stride_on = _offset_args(k, offset)
        B, N, C = q.shape
        n = k.shape[1]
        D = C // H
        block_d, block_n, block_m = _block_d(D), 32, 64
        du = torch.empty(B, N, C, device=q.device, dtype=torch.float32)
        dden = torch.empty(B, N, H, device=q.device, dtype=torch.float32)
        m_blocks = triton.cdiv(N, block_m)
        dpartial = torch.empty(B * H, m_blocks, D, D + 1, device=q.device, dtype=torch.float32)
        _attn_out_bwd[(m_blocks, B * H)](
            q, floor, q_norm, q_inv_pow_norm, state, grad, du, dden, dpartial, N, H, D,
            q.stride(0), q.stride(1), grad.stride(0), grad.stride(1), dpartial.stride(0), dpartial.stride(1),
            P=p, BLOCK_M=block_m, BLOCK_D=block_d)
        dstate = dpartial.sum(1)
        dphi = torch.empty(B, n, C, device=q.device, dtype=torch.float32)
        dv = torch.empty_like(dphi)
        _kv_state_bwd[(triton.cdiv(n, block_n), B * H)](
            k, offset_ptr, v, floor, k_norm, k_inv_pow_norm, dstate, dphi, dv, n, H, D, 1 / n,
            k.stride(0), k.stride(1), stride_ob, stride_on, v.stride(0), v.stride(1), P=p,
            HAS_OFFSET=offset is not None, BLOCK_N=block_n, BLOCK_D=block_d)
        dq, dfloor_q = _kernel_backward(q, floor, q_norm, q_inv_pow_norm, du, dden, p, True, H, 1 / n)
        dk, dfloor_k = _kernel_backward(k, floor, k_norm, k_inv_pow_norm, dphi, None, p, False, H, 1 / n, offset)
        dresidual = grad if ctx.has_residual else None
        doffset = dk.sum_to_size(key_offset.shape) if ctx.needs_input_grad[7] else None
        return dq, dk, dv.to(v.dtype), dfloor_q + dfloor_k, None, None, dresidual, doffset


def triton_focused_linear_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        floor: torch.Tensor,
        focusing_factor: float,
        num_heads: int,
        residual: Optional[torch.Tensor] = None,
        key_offset: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """`focused_linear_attention` (same arguments and result) as fused Triton kernels."""
    def unit_channel_stride(t):
        return t if t.stride(-1) == 1 else t.contiguous()

    q, k, v = unit_channel_stride(q), unit_channel_stride(k), unit_channel_stride(v)
    if residual is not None:
        residual = unit_channel_stride(residual)
    if v.dtype != q.dtype or k.dtype != q.dtype:
        k, v = k.to(q.dtype), v.to(q.dtype)
    if key_offset is not None:
        key_offset = unit_channel_stride(key_offset.to(k.dtype))
    return TritonAttentionFn.apply(q, k, v, floor, float(focusing_factor), num_heads, residual, key_offset)
