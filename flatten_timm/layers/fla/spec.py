""" The paper's equations in their own order of operations: what the 'reference' implementation runs and what
the tests compare every other implementation against.

    phi_p(x) = ||t|| t**p / ||t**p||,  t = (relu(x) + 1e-6) / s          (norms over all C channels)
    out_h    = phi(q)_h (phi(k)_h^T v_h / n) / (phi(q)_h . mean_n phi(k)_h + 1e-6)      for each head h
"""
import torch
import torch.nn.functional as F

__all__ = ['focusing_map', 'linear_attention']


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
