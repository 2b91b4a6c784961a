""" Focused linear attention by torch ops, with autograd: a backward that keeps only q, k and v.

Autograd through the forward's ops would keep phi(q), phi(k), the output's numerator and float32 copies of q
and k per layer; `TorchAttentionFn` keeps q, k and v (views of the projections, which autograd keeps anyway)
and recomputes the focused maps and the kv state from them in backward.

The backward carries its gradients multiplied by GRADIENT_SCALE. A channel at the floor maps to
~(1e-6 / s)**p (1e-18 for p = 3), and where a channel is at the floor in every key (or query), the gradients of
the other map are as small in it: the backward multiplies such values together (k_phi @ dstate for dv, dphi . u
and dphi * t**(p-1) in the focusing maps), and their ~1e-40 is subnormal in float32, which many CPUs compute
with many times slower (a training step of a tiny FLatten-DeiT made over a million of them). Scaled by 2**64
they stay normal. The scale, a power of two, changes no rounding; it is undone where the
gradients leave: dv in its matmul, dq and dk after the max() (which zeroes their entries at the floor), the
floor's gradient after its sum over tokens.
"""
import torch
from torch.autograd.function import once_differentiable

from .torch_inference import attend_without_autograd, diagonal_blocks, head_state

__all__ = ['GRADIENT_SCALE', 'TorchAttentionFn']

# the backward's values stay finite up to 2**128 / GRADIENT_SCALE ~ 1.8e19 (1 / normaliser is at most 1e6: output
# gradients up to ~1e13)
GRADIENT_SCALE = 2.0 ** 64


class TorchAttentionFn(torch.autograd.Function):
    """`attend_without_autograd` forward (in the layout the dispatcher chose), and its recomputing backward."""

    @staticmethod
    def forward(ctx, q, k, v, floor, p: float, num_heads: int, residual, key_offset, heads: str, join_qk: bool,
                stack_qk: bool):
        ctx.save_for_backward(q, k, v, floor, key_offset)
        ctx.p, ctx.num_heads, ctx.has_residual = p, num_heads, residual is not None
        ctx.block_diagonal, ctx.stack_qk = heads == 'block_diagonal', stack_qk
        return attend_without_autograd(q, k, v, floor, p, num_heads, residual, key_offset, heads, join_qk, stack_qk,
                                       in_place=True, overwrite_inputs=False)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        q, k, v, floor_param, key_offset = ctx.saved_tensors
        floor = floor_param.to(torch.promote_types(q.dtype, torch.float32))
        keys = k if key_offset is None else k + key_offset
        floor_grad = ctx.needs_input_grad[3]
        layout = (ctx.num_heads, ctx.block_diagonal, ctx.stack_qk, floor_grad)
        if v.dtype == torch.float16:  # in float32, as the forward ran
            with torch.autocast(q.device.type, enabled=False):
                dq, dk, dv, dfloor = _maps_backward(q, keys, v.float(), floor, grad.float(), ctx.p, *layout)
        else:
            dq, dk, dv, dfloor = _maps_backward(q, keys, v, floor, grad, ctx.p, *layout)
        dfloor = dfloor.to(floor_param.dtype) if floor_grad else None
        doffset = dk.sum_to_size(key_offset.shape) if ctx.needs_input_grad[7] else None
        dresidual = grad if ctx.has_residual else None
        return dq, dk, dv.to(v.dtype), dfloor, None, None, dresidual, doffset, None, None, None


def _maps_backward(q, keys, v, floor, grad, p: float, num_heads: int, block_diagonal: bool, stack_qk: bool,
                   floor_grad: bool):
    """Gradients of q, keys (k + key_offset), v and floor, as the forward computed them: phi(q) and phi(k)
    exactly, the normaliser's 1e-6 as n * 1e-6. stack_qk: queries and keys of one size are stacked, so that every
    pass of the focusing maps and their backward runs once over both."""
    n = keys.shape[1]
    attention_backward = _attention_backward_block_diagonal if block_diagonal else _attention_backward_per_head
    # du and dk_phi come times GRADIENT_SCALE (dv without it), and so do the maps' gradients down to the floor's
    if q.shape == keys.shape and stack_qk:
        maps = FocusingKernel(torch.stack([q, keys], dim=2), floor, p)  # (B, N, 2, C)
        q_phi, k_phi = maps.phi(v.dtype).unbind(2)
        du, dk_phi, dv = attention_backward(q_phi, k_phi, v, n * 1e-6, grad, num_heads)
        dphi = torch.stack([du, dk_phi], dim=2).to(floor.dtype)  # the maps' precision: float32 or wider
        dx, dfloor = maps.through_max(maps.backward(dphi), q.dtype, floor_grad)
        dq, dk = dx.unbind(2)
        return dq, dk, dv, dfloor.mul_(1 / GRADIENT_SCALE) if floor_grad else None
    queries, keys = FocusingKernel(q, floor, p), FocusingKernel(keys, floor, p)
    du, dk_phi, dv = attention_backward(queries.phi(v.dtype), keys.phi(v.dtype), v, n * 1e-6, grad, num_heads)
    dq, dfloor_q = queries.through_max(queries.backward(du.to(floor.dtype)), q.dtype, floor_grad)
    dk, dfloor_k = keys.through_max(keys.backward(dk_phi.to(floor.dtype)), q.dtype, floor_grad)
    return dq, dk, dv, dfloor_q.add_(dfloor_k).mul_(1 / GRADIENT_SCALE) if floor_grad else None


class FocusingKernel:
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

    def backward(self, dphi: torch.Tensor) -> torch.Tensor:
        """dt of phi = ||t|| u from dphi (consumed): ||t|| a (dphi - (dphi . u) u) p t**(p-1), plus the norm's
        (dphi . u) / ||t|| along t (a before any power: a cubed overflows where every channel is at the floor)."""
        dot = (dphi * self.unit).sum(-1, keepdim=True)
        dt = dphi.addcmul_(dot, self.unit, value=-1).mul_(self.pow_grad).mul_(self.norm * self.inv_pow_norm * self.p)
        return dt.addcmul_(dot / self.norm, self.t)

    def phi(self, dtype: torch.dtype) -> torch.Tensor:
        """phi_p(t) = ||t|| u, rounded to dtype (as the forward computed it)."""
        return torch.mul(self.unit, self.norm, out=torch.empty_like(self.unit, dtype=dtype))

    def through_max(self, dt: torch.Tensor, x_dtype: torch.dtype, floor_grad: bool):
        """Gradients of x and (if floor_grad) of floor from dt (consumed), that of t = max(x, floor), times
        GRADIENT_SCALE: x's comes without the scale, floor's with it (the caller undoes it after the sum over the
        tokens, whose terms alone may be subnormal)."""
        # 1 where x > floor, else 0 (t - floor is 0 exactly there), as a number: on a CPU, where() and products
        # with a boolean mask run 10-30x slower than products with a float one
        above = (self.t - self.floor).sign_()
        dfloor = torch.addcmul(dt, dt, above, value=-1).flatten(0, -2).sum(0) if floor_grad else None
        dx = dt.mul_(above)  # the entries at the floor, the tiny ones, are zero: the scale can go
        out = dx if dx.dtype == x_dtype else torch.empty_like(dx, dtype=x_dtype)
        return torch.mul(dx, 1 / GRADIENT_SCALE, out=out), dfloor


def _attention_backward_per_head(u, k_phi, v, eps, grad, num_heads: int):
    """Gradients of the queries u, keys k_phi and values from that of the output (eps: the normaliser's), one
    head at a time on column slices, as the forward: the matmuls read them in place."""
    B, N, C = u.shape
    d = C // num_heads
    du, dk_phi, dv = [], [], []
    for i in range(num_heads):
        cols = slice(i * d, (i + 1) * d)
        u_i, k_i, v_i, grad_i = u[..., cols], k_phi[..., cols], v[..., cols], grad[..., cols]
        # the forward's [k_phi^T v | sum k_phi] and [numerator | normaliser] again
        kv = torch.cat([torch.bmm(k_i.transpose(1, 2), v_i), k_i.sum(1).unsqueeze(-1)], dim=-1)
        out = torch.bmm(u_i, kv).to(torch.promote_types(u.dtype, torch.float32))
        normaliser = out[..., d:] + eps
        scaled_normaliser = normaliser * (1 / GRADIENT_SCALE)  # dout comes out times GRADIENT_SCALE
        # [dnumerator | dnormaliser], in v's dtype for the matmuls below
        dout = u.new_empty(B, N, d + 1)
        dout[..., :d] = grad_i / scaled_normaliser
        dnormaliser = (grad_i * out[..., :d]).sum(-1, keepdim=True).div_(normaliser * scaled_normaliser).neg_()
        dout[..., d:] = dnormaliser
        du.append(torch.bmm(dout, kv.transpose(1, 2)))
        dkv = torch.bmm(u_i.transpose(1, 2), dout)
        dstate, dsum = dkv[..., :d], dkv[..., d:]
        dk_phi.append(torch.baddbmm(dsum.transpose(1, 2), v_i, dstate.transpose(1, 2)))
        dv.append(_unscaled_bmm(k_i, dstate))
    du, dk_phi, dv = (x[0] if num_heads == 1 else torch.cat(x, dim=-1) for x in (du, dk_phi, dv))
    return du, dk_phi, dv


def _attention_backward_block_diagonal(u, k_phi, v, eps, grad, num_heads: int):
    """`_attention_backward_per_head` by block-diagonal matmuls over all heads (`head_state`)."""
    B, N, C = u.shape
    H = num_heads
    state = head_state(k_phi, v, H)
    out = torch.bmm(u, state).to(torch.promote_types(u.dtype, torch.float32))
    normaliser = (out[..., C:] + eps).unsqueeze(-1)
    scaled_normaliser = normaliser * (1 / GRADIENT_SCALE)  # dout comes out times GRADIENT_SCALE
    grad_heads = grad.unflatten(-1, (H, -1))
    # [dnumerator | dnormaliser], in v's dtype for the matmuls below
    dout = u.new_empty(B, N, C + H)
    dout[..., :C] = (grad_heads / scaled_normaliser).flatten(2)
    dnormaliser = (grad_heads * out[..., :C].unflatten(-1, (H, -1))).sum(-1, keepdim=True)
    dnormaliser = dnormaliser.div_(normaliser * scaled_normaliser).neg_()
    dout[..., C:] = dnormaliser.flatten(2)
    du = torch.bmm(dout, state.transpose(1, 2))
    dfull = torch.bmm(u.transpose(1, 2), dout)
    dstate = torch.zeros_like(dfull[..., :C])  # other heads' products are not in the function: no gradient
    diagonal_blocks(dstate, H).copy_(diagonal_blocks(dfull[..., :C], H))
    dsum = dfull[..., C:].view(B, H, C // H, H).diagonal(dim1=1, dim2=3).transpose(1, 2).reshape(B, 1, C)
    dk_phi = torch.baddbmm(dsum, v, dstate.transpose(1, 2))
    dv = _unscaled_bmm(k_phi, dstate)
    return du, dk_phi, dv


def _unscaled_bmm(a: torch.Tensor, scaled: torch.Tensor) -> torch.Tensor:
    """a @ scaled / GRADIENT_SCALE, the scale undone in the matmul itself (beta=0: the empty input is not read)."""
    return torch.baddbmm(a.new_empty(()), a, scaled, beta=0, alpha=1 / GRADIENT_SCALE)
