""" Properties of focused linear attention over drawn shapes, dtypes and inputs (hypothesis), every execution
path against a float64 transcription of the paper's equations written here.

The transcription (FLatten Transformer, Han et al., ICCV 2023):
    phi_p(x) = ||t|| t**p / ||t**p||,   t = (relu(x) + 1e-6) / s      (norms over all C channels, before the heads
                                                                       are split)
    out_h    = phi(q)_h (phi(k)_h^T v_h / n) / (phi(q)_h . mean_n phi(k)_h + 1e-6)     per head h, heads merged
and the fast paths' output adds a residual. The fast paths take q and k already shifted and divided by the
kernel's scale, q = (q_proj + 1e-6) / s, and floor = 1e-6 / s, so that their kernel is max(q, floor); a key
offset (the key positional encoding) is added to k first, in k's dtype.

Errors are relative over a whole tensor, ||a - ref|| / ||ref||, bounded per dtype by the worst measured over
random draws of the same space times a margin (TOLERANCES). The examples are drawn the same way on every run.

Where the math itself is ill-conditioned, the gradients are compared with care (outputs are compared
everywhere):
- one key: the output is v w / (w + 1e-6) with w = phi(q) . phi(k), so the gradients of q, k, floor and the
  key offset are 1e-6-sized differences of O(1) terms, which even float32 autograd of the transcription gets
  wrong by 100%. Gradients are compared with two keys or more;
- few keys: a query's focused channels can miss every key's (the power leaves them near disjoint) and its
  gradients are again differences of near-equal terms: each gradient's bound allows a multiple of what float32
  autograd of the transcription loses on the same inputs (CONDITIONING_MARGIN);
- few channels in half precision: with C < 16, tokens whose every channel is near zero are common, and there
  the normaliser is ~1e-6 and the attention steep, so half-precision rounding of such a token decides its
  gradient. Half-precision gradients are compared with C >= 16.
"""
import dataclasses
import importlib
import os
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from hypothesis import Phase, given, settings, strategies as st

from flatten_timm.layers import FocusedLinearAttention, focusing_map, linear_attention, run_focused_linear_attention
from flatten_timm.layers.attn_impl import triton_available

EPS = 1e-6  # the kernel's shift and the normaliser's, as in the paper's code
HEAD_DIMS = (4, 8, 12, 16, 24, 32)
HALF = (torch.bfloat16, torch.float16)

# reproducible in CI: the same examples on every run, no example database
PROPERTY = settings(derandomize=True, database=None, deadline=None)


# --- the paper's equations, transcribed (run in float64) -------------------------------------------------------

def spec_kernel(x, s):
    """The ReLU kernel divided by the learned per-channel scale: (relu(x) + 1e-6) / s."""
    return (F.relu(x) + EPS) / s


def spec_focusing(t, p):
    """f_p(t) = ||t|| t**p / ||t**p||: the power sharpens the direction, the norm stays (over all C channels)."""
    t_pow = t ** p
    return t.norm(dim=-1, keepdim=True) * t_pow / t_pow.norm(dim=-1, keepdim=True)


def spec_linear_attention(phi_q, phi_k, v, num_heads):
    """Per head phi(q) (phi(k)^T v / n) / (phi(q) . mean_n phi(k) + 1e-6), heads merged: (B, N, C)."""
    n = phi_k.shape[1]
    q, k, v = (x.unflatten(-1, (num_heads, -1)).transpose(1, 2) for x in (phi_q, phi_k, v))
    numerator = q @ (k.transpose(-2, -1) @ v / n)
    normaliser = (q * k.mean(dim=-2, keepdim=True)).sum(dim=-1, keepdim=True) + EPS
    return (numerator / normaliser).transpose(1, 2).flatten(2)


def spec_attention(q_proj, k_proj, v, s, p, num_heads):
    """The attention of projected queries, keys and values under kernel scale s."""
    phi_q, phi_k = spec_focusing(spec_kernel(q_proj, s), p), spec_focusing(spec_kernel(k_proj, s), p)
    return spec_linear_attention(phi_q, phi_k, v, num_heads)


def spec_fast_path(q, k, v, floor, p, num_heads, residual=None, key_offset=None, k_rounding=None):
    """The same attention on the fast paths' inputs: q = (q_proj + 1e-6) / s and floor = 1e-6 / s, so
    (relu(q_proj) + 1e-6) / s = max(q_proj + 1e-6, 1e-6) / s = max(q, floor). (Going back through
    q_proj = q s - 1e-6 instead would add float64 rounding of q s / 1e-6 to floor's gradient.)
    k_rounding: what rounding k + key_offset to the inputs' dtype changed (a constant), added to the keys."""
    if key_offset is not None:
        k = k + key_offset
    if k_rounding is not None:
        k = k + k_rounding
    phi_q, phi_k = spec_focusing(torch.maximum(q, floor), p), spec_focusing(torch.maximum(k, floor), p)
    out = spec_linear_attention(phi_q, phi_k, v, num_heads)
    return out if residual is None else out + residual


def relative_error(a, ref):
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


# --- drawn cases -------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    queries: int
    keys: int
    heads: int
    head_dim: int
    dtype: torch.dtype
    key_offset: bool
    residual: bool
    fused_qk: bool  # q and k as the two halves of one projection's output (only with keys == queries)
    amplitude: float  # of the projected q and k
    focusing_factor: float
    seed: int

    @property
    def channels(self):
        return self.heads * self.head_dim


@st.composite
def cases(draw, dtypes, max_tokens=40, min_keys=1, min_half_channels=0):
    """Shapes and options of one attention call. min_half_channels: the least C drawn for half precision."""
    dtype = draw(st.sampled_from(dtypes))
    heads = draw(st.integers(1, 4))
    min_channels = min_half_channels if dtype in HALF else 0
    head_dim = draw(st.sampled_from([d for d in HEAD_DIMS if heads * d >= min_channels]))
    queries = draw(st.integers(min_keys, max_tokens))
    keys = queries if draw(st.booleans()) else draw(st.integers(min_keys, queries))  # reduced keys
    return Case(
        batch=draw(st.integers(1, 2)), queries=queries, keys=keys, heads=heads, head_dim=head_dim, dtype=dtype,
        key_offset=draw(st.booleans()), residual=draw(st.booleans()),
        fused_qk=keys == queries and draw(st.booleans()), amplitude=draw(st.sampled_from([0.5, 1., 2.])),
        focusing_factor=draw(st.sampled_from([3., 2.5])), seed=draw(st.integers(0, 2 ** 31 - 1)))


@dataclasses.dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    floor: torch.Tensor
    residual: Optional[torch.Tensor]
    key_offset: Optional[torch.Tensor]

    def args(self, case: Case):
        return (self.q, self.k, self.v, self.floor, case.focusing_factor, case.heads, self.residual, self.key_offset)

    def named(self):
        tensors = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return {name: t for name, t in tensors.items() if t is not None}


def make_inputs(case: Case, requires_grad: bool, floor_grad: bool = True) -> Inputs:
    """The fast paths' inputs, as the module makes them: q and k from projections shifted and divided by a kernel
    scale s = softplus(randn / 2), floor = 1e-6 / s in float32 (the parameters' dtype; float64 in a float64
    run), the key offset divided by s too."""
    g = torch.Generator().manual_seed(case.seed)
    B, N, n, C = case.batch, case.queries, case.keys, case.channels

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    s = F.softplus(randn(C) * 0.5)
    if case.fused_qk:  # one projection's q and k (and v) chunks: token stride 3C
        q_proj, k_proj = (randn(B, N, 3 * C) * case.amplitude)[..., :2 * C].chunk(2, dim=-1)
    else:
        q_proj, k_proj = randn(B, N, C) * case.amplitude, randn(B, n, 2 * C)[..., :C] * case.amplitude
    dtype = case.dtype
    if case.fused_qk:
        qk = (torch.cat([q_proj, k_proj], dim=-1) + EPS) / s.repeat(2)
        qk = torch.cat([qk, randn(B, N, C)], dim=-1).to(dtype)  # the unused third of the projection
        q, k = qk[..., :C], qk[..., C:2 * C]
    else:
        q, k = ((q_proj + EPS) / s).to(dtype), ((k_proj + EPS) / s).to(dtype)
    v = randn(B, n, C).to(dtype)
    floor = (EPS / s).to(torch.float64 if dtype == torch.float64 else torch.float32)
    residual = randn(B, N, C).to(dtype) if case.residual else None
    key_offset = (0.5 * case.amplitude * randn(1, n, C) / s).to(dtype) if case.key_offset else None
    inputs = Inputs(q, k, v, floor, residual, key_offset)
    if requires_grad:
        if case.fused_qk:  # the leaf is the projection: q and k stay its halves
            qk = qk.detach().requires_grad_()
            inputs.q, inputs.k = qk[..., :C], qk[..., C:2 * C]
        else:
            inputs.q, inputs.k = q.requires_grad_(), k.requires_grad_()
        for name in ('v', 'residual', 'key_offset'):
            if getattr(inputs, name) is not None:
                getattr(inputs, name).requires_grad_()
        floor.requires_grad_(floor_grad)
    return inputs


def reference(case: Case, inputs: Inputs, dtype=torch.float64):
    """The transcription's output on copies of the inputs in `dtype` (leaves for autograd), and the copies."""
    copies = {name: t.detach().to(dtype).requires_grad_(t.requires_grad) for name, t in inputs.named().items()}
    k_rounding = None
    if inputs.key_offset is not None and case.dtype != torch.float64:
        # the implementations add the key offset in k's dtype: the reference keys carry the same rounding
        k_rounding = ((inputs.k + inputs.key_offset).detach().double() - (
            inputs.k.detach().double() + inputs.key_offset.detach().double())).to(dtype)
    out = spec_fast_path(copies['q'], copies['k'], copies['v'], copies['floor'], case.focusing_factor, case.heads,
                         copies.get('residual'), copies.get('key_offset'), k_rounding)
    return out, copies


@dataclasses.dataclass(frozen=True)
class Tolerance:
    output: float
    grad: float


# The torch path's worst relative errors over 1000 random draws per dtype (gradients with two keys or more and,
# in half precision, C >= 16), and the bounds:
#   float32: output 1.8e-7 -> 2e-6; gradients of v and the residual 2e-7, of q, k, floor and the key offset
#     up to 4e-5 where well conditioned -> 1e-4 (plus the conditioning term below)
#   bfloat16: output 6.3e-3 -> 2e-2; gradients of v and the residual 6.5e-3 -> 5e-2 (q, k and floor's reach 0.1-0.2
#     with two keys: the conditioning term)
#   float16 (computed in float32, only the inputs and output rounded): output 2.6e-4 -> 2e-3; gradients 3e-3 (q)
#     -> 1e-2 (floor's reached 1.1e-2 with two keys)
#   float64: output 4e-16 -> 1e-12
# The Triton kernels measured alike.
TOLERANCES = {
    torch.float64: Tolerance(1e-12, 1e-9),
    torch.float32: Tolerance(2e-6, 1e-4),
    torch.bfloat16: Tolerance(2e-2, 5e-2),
    torch.float16: Tolerance(2e-3, 1e-2),
}
# The gradients are ill-conditioned at some inputs, in the math: with few keys a query's focused channels can
# miss every key's (the power p leaves them near disjoint), and with one key the output is
# v w / (w + 1e-6); there the gradients of q, k and floor are differences of near-equal terms, and float32
# autograd of the transcription itself loses up to 3% of them. So each gradient's bound also allows
# CONDITIONING_MARGIN times what float32 autograd of the transcription loses on the same inputs, scaled by how
# much coarser the dtype rounds (the implementation's error beyond the fixed bound measured at most 3.3x that,
# floor's in bfloat16; about 1x in float32, 0.1x in float16).
CONDITIONING_MARGIN = 10
ROUNDING_VS_FLOAT32 = {torch.float32: 1, torch.bfloat16: 2 ** 16, torch.float16: 2 ** 13}
# and between the module's two float32 paths: output 1.6e-6 -> 1e-5, gradients 1.8e-5 -> 2e-4
MODULE_TOL = Tolerance(1e-5, 2e-4)


def check_against_spec(case: Case, impl: str, autograd: bool, floor_grad: bool = True, overwrite: bool = False,
                       gradients: bool = True):
    """One call of implementation `impl` against the transcription: its output, and with autograd (and
    `gradients`) the gradients of every input that requires one. overwrite: without autograd, q, k and the
    residual are scratch space."""
    inputs = make_inputs(case, requires_grad=autograd, floor_grad=floor_grad)
    ref, copies = reference(case, inputs)
    tol = TOLERANCES[case.dtype]
    if autograd:
        out = run_focused_linear_attention(*inputs.args(case), attn_impl=impl)
    else:
        kept = {name: t.clone() for name, t in inputs.named().items() if name in ('v', 'floor', 'key_offset')}
        with torch.no_grad():
            out = run_focused_linear_attention(*inputs.args(case), attn_impl=impl, overwrite_inputs=overwrite)
        for name, before in kept.items():  # never scratch space
            assert torch.equal(getattr(inputs, name), before), name
    assert out.dtype == case.dtype and out.shape == inputs.q.shape
    assert torch.isfinite(out).all()
    assert relative_error(out, ref) < tol.output, 'output'
    if not (autograd and gradients):
        return
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(case.seed + 1), dtype=torch.float64)
    named = {name: t for name, t in inputs.named().items() if t.requires_grad}
    grads = torch.autograd.grad(out, list(named.values()), grad_out.to(case.dtype))
    ref_grads = torch.autograd.grad(ref, [copies[name] for name in named], grad_out)
    conditioning = [0.] * len(named)
    if case.dtype in ROUNDING_VS_FLOAT32:
        ref32, copies32 = reference(case, inputs, torch.float32)
        grads32 = torch.autograd.grad(ref32, [copies32[name] for name in named], grad_out.float())
        conditioning = [relative_error(g, r) * ROUNDING_VS_FLOAT32[case.dtype] for g, r in zip(grads32, ref_grads)]
    for (name, x), grad, ref_grad, lost in zip(named.items(), grads, ref_grads, conditioning):
        assert grad.shape == x.shape and grad.dtype == x.dtype, name
        assert torch.isfinite(grad).all(), name
        assert relative_error(grad, ref_grad) < tol.grad + CONDITIONING_MARGIN * lost, name


# --- the transcription -------------------------------------------------------------------------------------------

@settings(PROPERTY, max_examples=30)
@given(case=cases(dtypes=[torch.float64]))
def test_transcription_equals_the_spec_functions_in_float64(case):
    """The transcription and the library's spec functions (what the 'reference' path runs) are the same math; and
    on the fast paths' inputs (shifted and divided by s), max(q, floor) is the kernel."""
    g = torch.Generator().manual_seed(case.seed)
    B, N, n, C, p, H = case.batch, case.queries, case.keys, case.channels, case.focusing_factor, case.heads
    s = F.softplus(torch.randn(C, generator=g, dtype=torch.float64) * 0.5)
    q_proj, k_proj = (torch.randn(B, m, C, generator=g, dtype=torch.float64) * case.amplitude for m in (N, n))
    v = torch.randn(B, n, C, generator=g, dtype=torch.float64)
    ref = spec_attention(q_proj, k_proj, v, s, p, H)
    library = linear_attention(focusing_map(q_proj, s, p), focusing_map(k_proj, s, p), v, H)
    assert library.dtype == torch.float64
    assert relative_error(library, ref) < 1e-12
    fast_inputs = spec_fast_path((q_proj + EPS) / s, (k_proj + EPS) / s, v, EPS / s, p, H)
    assert relative_error(fast_inputs, ref) < 1e-12


# --- the torch path ----------------------------------------------------------------------------------------------

@settings(PROPERTY, max_examples=40)
@given(case=cases(dtypes=[torch.float64]), autograd=st.booleans(), overwrite=st.booleans())
def test_torch_path_outputs_equal_the_spec_in_float64(case, autograd, overwrite):
    """Every shape (one key and C = 4 included), in training and in inference, to float64 rounding."""
    check_against_spec(case, 'torch', autograd, overwrite=overwrite, gradients=False)


@settings(PROPERTY, max_examples=10, phases=[Phase.generate])  # no shrinking: every example shows it
@given(case=cases(dtypes=[torch.float64]), floor_grad=st.booleans())
def test_torch_path_gradients_equal_the_spec_in_float64(case, floor_grad):
    check_against_spec(case, 'torch', autograd=True, floor_grad=floor_grad)


@settings(PROPERTY, max_examples=100)
@given(case=cases(dtypes=[torch.float32, torch.bfloat16, torch.float16]), overwrite=st.booleans())
def test_torch_path_without_autograd_matches_the_spec(case, overwrite):
    """Inference: outputs of every shape and dtype, also with q, k and the residual used as scratch space."""
    check_against_spec(case, 'torch', autograd=False, overwrite=overwrite)


@settings(PROPERTY, max_examples=100)
@given(case=cases(dtypes=[torch.float32, torch.bfloat16, torch.float16], min_keys=2, min_half_channels=16),
       floor_grad=st.booleans())
def test_torch_path_with_autograd_matches_the_spec(case, floor_grad):
    """Training: outputs, and the gradients of q, k, v, floor, residual and key offset (floor's only when it
    requires one), against float64 autograd of the transcription."""
    check_against_spec(case, 'torch', autograd=True, floor_grad=floor_grad)


# --- the Triton kernels (CUDA, or the CPU under TRITON_INTERPRET=1, which conftest.py sets without a GPU) --------

needs_triton = pytest.mark.skipif(not triton_available(torch.device('cpu')),
                                  reason='Triton is not installed, or TRITON_INTERPRET=1 is not set')


@needs_triton
@pytest.mark.filterwarnings('error::RuntimeWarning')  # a kernel that fell back to torch ops fails, not passes
@settings(PROPERTY, max_examples=16)
@given(case=cases(dtypes=[torch.float32, torch.bfloat16, torch.float16], max_tokens=12, min_keys=2,
                  min_half_channels=16), autograd=st.booleans())
def test_triton_kernels_match_the_spec(case, autograd):
    """Tiny shapes: the interpreter runs every program of the kernels in Python."""
    check_against_spec(case, 'triton', autograd)


# --- the module: 'reference' (the spec's steps) against 'torch' ---------------------------------------------------

GRIDS = [(3, 5), (4, 4), (6, 2), (5, 3), (2, 6)]
module_impl_not_overridden = pytest.mark.skipif(
    bool(os.environ.get('FLATTEN_ATTN_IMPL')), reason='FLATTEN_ATTN_IMPL overrides the implementation a module picks')


@module_impl_not_overridden
@settings(PROPERTY, max_examples=40)
@given(grid=st.sampled_from(GRIDS), sr_ratio=st.sampled_from([1, 2]), heads=st.integers(1, 4),
       head_dim=st.sampled_from(HEAD_DIMS), batch=st.integers(1, 2), qkv_bias=st.booleans(),
       autograd=st.booleans(), scaling_pass=st.booleans(), seed=st.integers(0, 2 ** 31 - 1))
def test_module_torch_path_equals_its_reference_path(grid, sr_ratio, heads, head_dim, batch, qkv_bias, autograd,
                                                      scaling_pass, seed):
    """FocusedLinearAttention on tokens of an h x w grid (sr_ratio=2: keys from the reduced grid), its 'torch'
    path (kernel scale folded into the projections, or in inference applied by a pass as wide layers do on a
    CPU; key encoding and residual) against its 'reference' path (the spec's steps): outputs, and the gradients
    of the input and of every parameter."""
    modules = importlib.import_module('flatten_timm.layers.fla.modules')
    fold_limit = modules.FOLDED_PROJECTION_MAX_ELEMENTS
    modules.FOLDED_PROJECTION_MAX_ELEMENTS = 0 if scaling_pass else 2 ** 62
    try:
        _module_torch_path_equals_its_reference_path(grid, sr_ratio, heads, head_dim, batch, qkv_bias, autograd,
                                                     seed)
    finally:
        modules.FOLDED_PROJECTION_MAX_ELEMENTS = fold_limit


def _module_torch_path_equals_its_reference_path(grid, sr_ratio, heads, head_dim, batch, qkv_bias, autograd, seed):
    torch.manual_seed(seed)
    dim = heads * head_dim
    layer = FocusedLinearAttention(dim, heads, grid_size=grid, sr_ratio=sr_ratio, qkv_bias=qkv_bias)
    with torch.no_grad():  # the kernel scale and key positional encoding start at zero: give them values
        layer.scale.normal_(0, 0.5)
        layer.positional_encoding.normal_(0, 0.5)
    x = torch.randn(batch, grid[0] * grid[1], dim, requires_grad=autograd)
    x_before = x.detach().clone()
    grad_out = torch.randn(x.shape)
    params = dict(layer.named_parameters())
    outs, grads = {}, {}
    for impl in ('reference', 'torch'):
        layer.attn_impl = impl
        with torch.set_grad_enabled(autograd):
            outs[impl] = layer(x, grid)
        if autograd:
            grads[impl] = torch.autograd.grad(outs[impl], [x, *params.values()], grad_out)
    assert torch.equal(x, x_before)  # inference uses the layer's own buffers as scratch space, never its input
    assert relative_error(outs['torch'], outs['reference']) < MODULE_TOL.output
    if autograd:
        for name, g, r in zip(['x', *params], grads['torch'], grads['reference']):
            assert relative_error(g, r) < MODULE_TOL.grad, name
