""" Focused linear attention by torch ops, without autograd: few passes over memory, on tokens of any strides.

The module hands over q and k already shifted and divided by the kernel's scale, q = (q_proj + 1e-6) / s (it
folds 1 / s and the shift into its projection, or applies them by one pass), so the kernel (relu(q_proj) + 1e-6) / s
is max(q, floor) with floor = 1e-6 / s. Then
- the kernel, its power and both norms are a few passes, over q and k at once when they are the two halves of
  one projection's output (or stacked, on a GPU);
- the 1 / n of the spec's k^T v / n and mean(phi(k)) cancels between numerator and normaliser but for the
  normaliser's 1e-6, which becomes n * 1e-6;
- the normaliser phi(q) . sum(phi(k)) is one more column of the matmul that gives the numerator.
How the heads run (`HEAD_LAYOUTS`) and whether q and k share passes is the dispatcher's choice (dispatch.py).
"""
from typing import Optional

import torch

__all__ = ['HEAD_LAYOUTS', 'attend_without_autograd']

# one head at a time on column slices; all heads by one batched matmul; or as one block-diagonal matmul
HEAD_LAYOUTS = ('loop', 'one_matmul', 'block_diagonal')


def focused(x: torch.Tensor, floor: torch.Tensor, p: float, dtype: torch.dtype, in_place: bool,
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


def adjacent_halves(q: torch.Tensor, k: torch.Tensor) -> Optional[torch.Tensor]:
    """q and k as one (B, N, 2, C) view when k's channels follow q's in the same rows (the two halves of one
    projection's output), else None. Eager tensors only: traced ones have no storage to compare."""
    C = q.shape[-1]
    if (q.shape != k.shape or q.stride() != k.stride() or q.dtype != k.dtype or q.stride(-1) != 1
            or q.stride(1) < 2 * C or k.storage_offset() - q.storage_offset() != C
            or q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()):
        return None
    return q.as_strided((q.shape[0], q.shape[1], 2, C), (q.stride(0), q.stride(1), C, 1))


def diagonal_blocks(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The heads' (d, d) diagonal blocks of a (B, C, C) view, as a (B, d, d, H) view."""
    B, C = x.shape[:2]
    return x.view(B, num_heads, C // num_heads, num_heads, C // num_heads).diagonal(dim1=1, dim2=3)


def head_state(k_phi: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[k^T v | sum k] of all heads as one (B, C, C + H) matrix: each head's block on the diagonal, its
    normaliser in column C + h; zeros elsewhere, so (B, N, C) queries times it give every head's output."""
    B, n, C = k_phi.shape
    H = num_heads
    state = k_phi.new_zeros(B, C, C + H)
    diagonal_blocks(state[..., :C], H).copy_(diagonal_blocks(torch.bmm(k_phi.transpose(1, 2), v), H))
    state[..., C:].view(B, H, C // H, H).diagonal(dim1=1, dim2=3).copy_(k_phi.sum(1).view(B, H, -1).transpose(1, 2))
    return state


def _attend_block_diagonal(q_phi, k_phi, v, eps, num_heads: int, residual, overwrite_inputs: bool) -> torch.Tensor:
    """Every head's attention by two matmuls over all C channels (`head_state`): a fixed number of ops and no
    copies of the heads, where a loop over heads launches six ops per head."""
    C, H = q_phi.shape[-1], num_heads
    out = torch.bmm(q_phi, head_state(k_phi, v, H))
    numerator, normaliser = out[..., :C].unflatten(-1, (H, -1)), (out[..., C:] + eps).unsqueeze(-1)
    if residual is None:
        return (numerator / normaliser).flatten(2).to(v.dtype)
    heads = residual.unflatten(-1, (H, -1))
    out = heads.addcdiv_(numerator, normaliser) if overwrite_inputs else torch.addcdiv(heads, numerator, normaliser)
    return out.flatten(2).to(v.dtype)


def attend_without_autograd(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        floor: torch.Tensor,
        focusing_factor: float,
        num_heads: int,
        residual: Optional[torch.Tensor],
        key_offset: Optional[torch.Tensor],
        heads: str,
        join_qk: bool,
        stack_qk: bool,
        in_place: bool,
        overwrite_inputs: bool,
) -> torch.Tensor:
    """(B, N, C) queries, (B, n, C) keys and values to (B, N, C) outputs in v's dtype (+ residual).

    key_offset, broadcastable to k (the key positional encoding), is added to k first. heads: one of
    `HEAD_LAYOUTS`. join_qk: focus q and k in the same passes where they are the two halves of one projection's
    output (eager tensors only: traced ones have no storage to compare); stack_qk: otherwise stack q and k of one
    size for that. in_place: powers and scalings overwrite their input (fewer allocations and page faults);
    overwrite_inputs: q, k and residual are the caller's scratch space too.
    """
    if v.dtype == torch.float16:
        # fp16's range holds neither the kv state's sums nor the quotients' gradients at small head dims: the
        # attention runs in float32, autocast off (it would round the matmuls back to fp16), and only its output
        # is rounded to fp16
        with torch.autocast(q.device.type, enabled=False):
            out = _attend(q, k, v.float(), floor, focusing_factor, num_heads, residual, key_offset, heads, join_qk,
                          stack_qk, in_place, overwrite_inputs)
        return out.to(torch.float16)
    return _attend(q, k, v, floor, focusing_factor, num_heads, residual, key_offset, heads, join_qk, stack_qk,
                   in_place, overwrite_inputs)


def _attend(q, k, v, floor, p: float, num_heads: int, residual, key_offset, heads: str, join_qk: bool,
            stack_qk: bool, in_place: bool, overwrite_inputs: bool) -> torch.Tensor:
    B, N, C = q.shape
    n = k.shape[1]
    d = C // num_heads
    floor = floor.to(torch.promote_types(q.dtype, torch.float32))
    overwrite_inputs = overwrite_inputs and in_place
    if key_offset is not None:
        k = k.add_(key_offset) if overwrite_inputs else k + key_offset

    dtype = v.dtype
    eps = n * 1e-6  # the spec's 1e-6, times n (see the module's docstring)
    qk = adjacent_halves(q, k) if join_qk else None
    if qk is None and stack_qk and q.shape == k.shape and q.dtype == k.dtype:
        qk = torch.stack([q, k], dim=2)  # on a GPU one copy costs less than the launches it saves
    if qk is not None:  # both maps in the same passes
        q_phi, k_phi = focused(qk, floor, p, dtype, in_place, overwrite_inputs).unbind(2)
    else:
        q_phi = focused(q, floor, p, dtype, in_place, overwrite_inputs)
        k_phi = focused(k, floor, p, dtype, in_place, overwrite_inputs)
    if heads == 'block_diagonal':
        return _attend_block_diagonal(q_phi, k_phi, v, eps, num_heads, residual, overwrite_inputs)
    if heads == 'one_matmul':
        k_heads = k_phi.reshape(B, n, num_heads, d).transpose(1, 2)
        kv = torch.matmul(k_heads.transpose(-2, -1), v.reshape(B, n, num_heads, d).transpose(1, 2))
        kv = torch.cat([kv, k_heads.sum(dim=-2).unsqueeze(-1)], dim=-1)
        out = torch.matmul(q_phi.reshape(B, N, num_heads, d).transpose(1, 2), kv)
        out = (out[..., :d] / (out[..., d:] + eps)).transpose(1, 2).reshape(B, N, C)
        if residual is not None:
            out = residual.add_(out) if overwrite_inputs else out + residual
        return out.to(v.dtype)
    outputs = []
    # one head at a time on strided column slices: matmuls read them in place, no per-head copies
    for i in range(num_heads):
        cols = slice(i * d, (i + 1) * d)
        k_i = k_phi[..., cols]
        # [k^T v | sum(k)]: the normaliser is one more column of the numerator's matmul
        kv = torch.cat([torch.bmm(k_i.transpose(1, 2), v[..., cols]), k_i.sum(dim=1).unsqueeze(-1)], dim=-1)
        out = torch.bmm(q_phi[..., cols], kv)
        numerator, normaliser = out[..., :d], out[..., d:] + eps
        if residual is None:
            outputs.append(numerator / normaliser)
        elif overwrite_inputs:
            outputs.append(residual[..., cols].addcdiv_(numerator, normaliser))
        else:
            outputs.append(torch.addcdiv(residual[..., cols], numerator, normaliser))
    if overwrite_inputs and residual is not None:
        return residual.to(v.dtype)  # every head was written into its columns
    out = outputs[0] if num_heads == 1 else torch.cat(outputs, dim=-1)
    return out.to(v.dtype)
