""" The implementations of focused linear attention against the spec's reference, and their selection.

The fused Triton kernels run here on the CPU under TRITON_INTERPRET=1 (conftest.py sets it when there is
no GPU; tiny shapes) and on CUDA when there is one; references are computed in float64 by the
step-by-step functions of the spec. Every test here turns warnings into errors, so a kernel that fell
back to torch ops fails instead of passing on the torch result.
"""
import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F

from flatten_timm.layers import FocusedLinearAttention, focusing_map, linear_attention, set_attn_impl
from flatten_timm.layers import attn_impl as attn_impl_module
from flatten_timm.layers.attn_impl import ImplSelector, resolve_attn_impl, triton_available
from flatten_timm.layers.focused_linear_attention import focused_linear_attention, run_focused_linear_attention

pytestmark = pytest.mark.filterwarnings('error::RuntimeWarning')

DEVICE = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
needs_triton = pytest.mark.skipif(not triton_available(DEVICE), reason='Triton is not installed')


def spec_attention(q, k, v, floor, p, num_heads, residual):
    """The spec's steps in float64: relu kernel / s with its 1e-6, focusing over C, per-head normaliser."""
    scale = 1e-6 / floor.double()  # floor = 1e-6 / s
    q_raw = q.double() * scale - 1e-6  # q = (q_proj + 1e-6) / s  ->  q_proj
    k_raw = k.double() * scale - 1e-6
    out = linear_attention(focusing_map(q_raw, scale, p), focusing_map(k_raw, scale, p), v.double(), num_heads)
    return out + residual.double()


def make_inputs(B, N, n, C, dtype, seed, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    scale = F.softplus(torch.randn(C, generator=g) * 0.5)
    floor = (1e-6 / scale).to(DEVICE)
    # q and k as chunks of one fused projection, as the models pass them (token stride 3C)
    qkv = torch.randn(B, N, 3 * C, generator=g)
    q = qkv[..., :C]
    k = torch.randn(B, n, 2 * C, generator=g)[..., :C] if n != N else qkv[..., C:2 * C]
    v = torch.randn(B, n, C, generator=g)
    residual = torch.randn(B, N, C, generator=g)
    tensors = [t.to(DEVICE, dtype) for t in (q, k, v, residual)]
    if requires_grad:
        tensors = [t.detach().requires_grad_() for t in tensors]
        floor.requires_grad_()
    return (*tensors, floor)


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# (batch, queries, keys, channels, heads): odd sizes, head dims 4 / 8 / 16 / 24, reduced keys, one head
# (whose kernels compute the token norms in their own tiles) with a head dim below its block
SHAPES = [(2, 37, 37, 32, 2), (1, 50, 13, 48, 2), (2, 29, 29, 72, 3), (1, 66, 66, 32, 4), (2, 17, 5, 16, 1),
          (1, 70, 70, 24, 1), (2, 30, 30, 16, 4), (1, 45, 12, 32, 8)]


@pytest.mark.parametrize('impl', ['torch', pytest.param('triton', marks=needs_triton)])
@pytest.mark.parametrize('dtype,tol', [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize('shape', SHAPES)
def test_outputs_and_gradients_match_the_spec(impl, dtype, tol, shape):
    """Both implementations, with a key offset (the key positional encoding, added to k inside them)."""
    q, k, v, residual, floor = make_inputs(*shape[:4], dtype=dtype, seed=sum(shape))
    key_offset = (0.3 * torch.randn(1, *k.shape[1:], generator=torch.Generator().manual_seed(2))).to(
        DEVICE, dtype).requires_grad_()
    heads = shape[4]
    out = run_focused_linear_attention(q, k, v, floor, 3, heads, residual, key_offset, attn_impl=impl)
    assert out.dtype == dtype and out.shape == q.shape
    grad = torch.randn_like(out)
    inputs = (q, k, v, residual, floor, key_offset)
    grads = torch.autograd.grad(out, inputs, grad)

    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref_q, ref_k, ref_v, ref_residual, ref_floor, ref_offset = ref_inputs
    # as the implementations do, k + offset is rounded to k's dtype
    ref_k_offset = ref_k + ref_offset + ((k + key_offset).detach().double() - (k.double() + key_offset.double()))
    ref = spec_attention(ref_q, ref_k_offset, ref_v, ref_floor, 3, heads, ref_residual)
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad.double())
    assert relative_error(out, ref) < tol
    for name, g, r in zip(('q', 'k', 'v', 'residual', 'floor', 'key_offset'), grads, ref_grads):
        assert torch.isfinite(g).all(), name
        # the floor's gradient (~1e-7) sums near-cancelling terms over every token: float32 keeps ~3 digits
        assert relative_error(g, r) < (max(tol * 5, 3e-3) if name == 'floor' else tol * 5), name


def force_block_diagonal_heads(monkeypatch, block_diagonal: bool):
    """Heads as block-diagonal matmuls (what a GPU runs in half precision) or not, on any device."""
    module = importlib.import_module('flatten_timm.layers.fla.dispatch')
    monkeypatch.setattr(module, '_block_diagonal_pays', lambda q, num_heads: block_diagonal and num_heads > 1)


@pytest.fixture(params=['heads_in_a_loop', 'heads_in_one_matmul', 'heads_block_diagonal'])
def heads_path(request, monkeypatch):
    """The torch path's three ways through the heads (chosen by device, dtype and batch x tokens), each forced."""
    module = importlib.import_module('flatten_timm.layers.fla.dispatch')
    monkeypatch.setattr(module, '_BATCHED_HEADS_MAX_TOKENS', 0 if request.param == 'heads_in_a_loop' else 10 ** 9)
    force_block_diagonal_heads(monkeypatch, request.param == 'heads_block_diagonal')
    return request.param


@pytest.mark.parametrize('shape', [(2, 37, 37, 32, 2), (1, 50, 13, 48, 3)])
def test_every_head_path_matches_the_spec(heads_path, shape):
    q, k, v, residual, floor = make_inputs(*shape[:4], dtype=torch.float32, seed=sum(shape))
    out = focused_linear_attention(q, k, v, floor, 3, shape[4], residual)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = spec_attention(*ref_inputs, floor, 3, shape[4], residual)
    assert relative_error(out, ref) < 1e-5
    for g, r in zip(grads, torch.autograd.grad(ref.sum(), ref_inputs)):
        assert relative_error(g, r) < 5e-5
    with torch.no_grad():  # and overwriting its scratch inputs
        scratch = [t.detach().clone() for t in (q, k, residual)]
        fast = focused_linear_attention(scratch[0], scratch[1], v.detach(), floor.detach(), 3, shape[4], scratch[2],
                                        overwrite_inputs=True)
    torch.testing.assert_close(fast, out.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('impl', ['torch', pytest.param('triton', marks=needs_triton)])
def test_focusing_factor_other_than_three(impl):
    q, k, v, residual, floor = make_inputs(1, 24, 24, 32, torch.float32, seed=3)
    out = run_focused_linear_attention(q, k, v, floor, 2.5, 2, residual, attn_impl=impl)
    ref = spec_attention(q, k, v, floor, 2.5, 2, residual)
    assert relative_error(out, ref) < 1e-5


@pytest.mark.parametrize('impl', ['torch', pytest.param('triton', marks=needs_triton)])
def test_fp16_survives_all_negative_queries(impl):
    q, k, v, residual, floor = make_inputs(1, 40, 40, 32, torch.float16, seed=5, requires_grad=False)
    q = -q.abs() - 1  # every query maps to the kernel's floor
    out = run_focused_linear_attention(q, k, v, floor, 3, 2, residual, attn_impl=impl)
    assert torch.isfinite(out).all()
    assert relative_error(out, spec_attention(q, k, v, floor, 3, 2, residual)) < 1e-2


def test_without_autograd_the_in_place_path_gives_the_same_result():
    q, k, v, residual, floor = make_inputs(2, 30, 30, 32, torch.float32, seed=7, requires_grad=False)
    with torch.no_grad():
        fast = focused_linear_attention(q, k, v, floor, 3, 2, residual)
    with torch.enable_grad():
        graph = focused_linear_attention(q, k, v, floor, 3, 2, residual)
    torch.testing.assert_close(fast, graph, rtol=0, atol=0)


@pytest.mark.parametrize('heads', [1, 2])
def test_overwriting_the_inputs_gives_the_same_result(heads):
    q, k, v, residual, floor = make_inputs(2, 30, 30, 32, torch.float32, seed=9, requires_grad=False)
    expected = focused_linear_attention(q, k, v, floor, 3, heads, residual)
    scratch = [t.clone() for t in (q, k, residual)]
    with torch.no_grad():
        out = focused_linear_attention(scratch[0], scratch[1], v, floor, 3, heads, scratch[2], overwrite_inputs=True)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert out.data_ptr() == scratch[2].data_ptr()  # written into the residual's buffer


@pytest.mark.parametrize('impl', ['torch', pytest.param('triton', marks=needs_triton)])
def test_module_paths_agree_with_the_reference_path(impl):
    torch.manual_seed(0)
    attn = FocusedLinearAttention(48, num_heads=3, grid_size=(5, 7), sr_ratio=2).to(DEVICE)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    x = torch.randn(2, 35, 48, device=DEVICE, requires_grad=True)
    outs, grads = {}, {}
    for name in ('reference', impl):
        attn.attn_impl = name
        outs[name] = attn(x, (5, 7))
        grads[name] = torch.autograd.grad(outs[name].sum(), [x, attn.scale, attn.positional_encoding])
    torch.testing.assert_close(outs[impl], outs['reference'], rtol=1e-4, atol=1e-4)
    for g, r in zip(grads[impl], grads['reference']):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-4)
    with torch.no_grad():  # inference overwrites the layer's own buffers, never its input
        x_before = x.detach().clone()
        torch.testing.assert_close(attn(x, (5, 7)), outs['reference'], rtol=1e-4, atol=1e-4)
        assert torch.equal(x, x_before)


def test_unknown_implementation_is_a_clear_error():
    with pytest.raises(ValueError, match="attn_impl='fast'.*auto, torch, triton, reference"):
        FocusedLinearAttention(16, 2, attn_impl='fast')
    with pytest.raises(ValueError, match='FLATTEN_ATTN_IMPL'):
        resolve_attn_impl('auto', env_override='tritno')
    assert resolve_attn_impl('auto', env_override='torch') == 'torch'  # the variable wins


def test_set_attn_impl_reaches_every_layer():
    import timm
    from test_models import TINY
    model = timm.create_model('flatten_swin_tiny_patch4_224', **TINY['flatten_swin_tiny_patch4_224'])
    set_attn_impl(model, 'reference')
    layers = [m for m in model.modules() if isinstance(m, FocusedLinearAttention)]
    assert layers and all(m.attn_impl == 'reference' for m in layers)


class FakeTimer:
    """Fixed durations by implementation name; runs what it times, and records which and how."""

    def __init__(self, durations):
        self.durations, self.calls = durations, []

    def __call__(self, name, fn):
        self.calls.append((name, torch.is_grad_enabled()))
        fn()
        return self.durations[name]


def implementations(log):
    def torch_ops(x):
        log.append('torch')
        return x * 2

    def fused_kernels(x):
        log.append('triton')
        return x * 3

    return {'torch': torch_ops, 'triton': fused_kernels}


def test_auto_selection_picks_the_faster_and_caches_per_shape():
    timer = FakeTimer({'torch': 2.0, 'triton': 1.0})
    selector = ImplSelector(timer)
    log = []
    x = torch.ones(2)
    assert selector.run(('shape a',), implementations(log), (x,)).tolist() == [3, 3]  # the faster one's result
    assert [name for name, _ in timer.calls] == ['torch', 'triton']
    log.clear()
    assert selector.run(('shape a',), implementations(log), (x,)).tolist() == [3, 3]
    assert len(timer.calls) == 2 and log == ['triton']  # cached: no timing
    timer.durations = {'torch': 1.0, 'triton': 3.0}
    assert selector.run(('shape b',), implementations(log), (x,)).tolist() == [2, 2]  # a new key is timed anew
    assert selector.choices == {('shape a',): 'triton', ('shape b',): 'torch'}


def test_training_is_timed_with_backward_on_detached_inputs():
    selector = ImplSelector(FakeTimer({'torch': 1.0, 'triton': 2.0}))
    backwards = []

    def torch_ops(x):
        y = x * 2
        y.register_hook(lambda g: backwards.append('torch'))
        return y

    x = torch.ones(3, requires_grad=True)
    out = selector.run(('k',), {'torch': torch_ops, 'triton': lambda t: t * 3}, (x,))
    assert backwards == ['torch']  # the timing ran a backward...
    assert x.grad is None  # ...that never reached the caller's tensors
    out.sum().backward()
    assert x.grad.tolist() == [2, 2, 2]


def test_auto_selection_falls_back_once_on_a_kernel_that_does_not_compile():
    def broken(x):
        raise RuntimeError('PassManager::run failed')

    timer = FakeTimer({'torch': 5.0, 'triton': 1.0})
    selector = ImplSelector(timer)
    impls = dict(implementations([]), triton=broken)
    x = torch.ones(1)
    with pytest.warns(RuntimeWarning, match="'triton' implementation failed.*PassManager"):
        assert selector.run(('k',), impls, (x,)).item() == 2
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # one warning only
        assert selector.run(('other',), impls, (x,)).item() == 2
        assert selector.call('triton', impls, (x,)).item() == 2  # forced, it falls back too
    assert selector.choices == {('k',): 'torch', ('other',): 'torch'}


def test_auto_is_torch_on_cpu_without_timing(monkeypatch):
    monkeypatch.setattr(attn_impl_module.SELECTOR, 'timer', lambda name, fn: pytest.fail('timed on CPU'))
    q, k, v, residual, floor = make_inputs(1, 10, 10, 16, torch.float32, seed=1, requires_grad=False)
    if DEVICE.type == 'cpu':
        out = run_focused_linear_attention(q, k, v, floor, 3, 1, residual, attn_impl='auto')
        torch.testing.assert_close(out, focused_linear_attention(q, k, v, floor, 3, 1, residual))


@needs_triton
def test_auto_selection_runs_the_real_implementations_with_gradients():
    from flatten_timm.layers.attn_impl import selection_key
    from flatten_timm.layers.fla.dispatch import _IMPLEMENTATIONS
    timer = FakeTimer({'torch': 2.0, 'triton': 1.0})
    selector = ImplSelector(timer)
    q, k, v, residual, floor = make_inputs(1, 20, 20, 32, torch.float32, seed=11)
    args = (q, k, v, floor, 3, 2, residual)
    out = selector.run(selection_key(args), _IMPLEMENTATIONS, args)
    assert selector.choices[selection_key(args)] == 'triton' and timer.calls == [('torch', True), ('triton', True)]
    assert q.grad is None
    torch.testing.assert_close(out, focused_linear_attention(*args), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(floor.grad).all()


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('shape', [s for s in SHAPES if s[4] > 1])
def test_block_diagonal_heads_equal_the_loop_over_heads(monkeypatch, shape, dtype):
    q, k, v, residual, floor = make_inputs(*shape[:4], dtype, seed=5, requires_grad=False)
    outs = {}
    for block_diagonal in (False, True):
        force_block_diagonal_heads(monkeypatch, block_diagonal)
        scratch = [t.clone() for t in (q, k, residual)]
        outs[block_diagonal] = [
            focused_linear_attention(q, k, v, floor, 3, shape[4], residual),
            focused_linear_attention(q, k, v, floor, 3, shape[4]),
            focused_linear_attention(scratch[0], scratch[1], v, floor, 3, shape[4], scratch[2], overwrite_inputs=True)]
    # bf16: the two round their products in different orders, up to one unit in the last place
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for loop, block in zip(outs[False], outs[True]):
        assert block.dtype == dtype
        torch.testing.assert_close(block, loop, rtol=tol, atol=tol)


def force_stacked_maps(monkeypatch, stacked: bool):
    """Queries and keys of one size stacked in the backward (what a GPU runs) or not, on any device."""
    module = importlib.import_module('flatten_timm.layers.fla.dispatch')
    monkeypatch.setattr(module, '_stacking_pays', lambda q: stacked)


@pytest.mark.parametrize('p', [3, 2.5])
@pytest.mark.parametrize('B, N, n, C, H, block_diagonal, stacked', [
    (2, 5, 5, 6, 1, False, False), (2, 5, 5, 6, 1, False, True), (1, 7, 4, 8, 2, False, True),
    (1, 7, 4, 8, 2, True, False), (2, 6, 6, 9, 3, True, True)])
def test_torch_path_backward_has_the_gradients_of_its_formula(monkeypatch, p, B, N, n, C, H, block_diagonal,
                                                              stacked):
    """The torch path's backward (the focused maps and kv state recomputed from q and k + key_offset, gradients
    by hand, heads one at a time or block-diagonal, queries and keys stacked or apart) against numerical
    gradients, in float64, with about half of q and k below the floor."""
    force_block_diagonal_heads(monkeypatch, block_diagonal)
    force_stacked_maps(monkeypatch, stacked)
    g = torch.Generator().manual_seed(3)
    q, k, v, residual = (torch.randn(B, m, C, generator=g, dtype=torch.float64).requires_grad_()
                         for m in (N, n, n, N))
    key_offset = (0.5 * torch.randn(1, n, C, generator=g, dtype=torch.float64)).requires_grad_()
    floor = (0.05 + torch.rand(C, generator=g, dtype=torch.float64)).requires_grad_()
    torch.autograd.gradcheck(lambda *a: focused_linear_attention(*a[:4], p, H, *a[4:]),
                             (q, k, v, floor, residual, key_offset))


def test_training_keeps_only_q_k_and_v():
    """With gradients, the torch path keeps q, k and v (which the projections' autograd keeps anyway) and
    recomputes the focused maps in backward: autograd through its ops kept phi(q), phi(k), the output's
    numerator and float32 copies of q and k."""
    q, k, v, residual, floor = make_inputs(2, 64, 64, 32, torch.bfloat16, seed=4)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = focused_linear_attention(q, k, v, floor, 3, 2, residual)
    inputs = {t.untyped_storage().data_ptr() for t in (q, k, v)}
    large = [t for t in kept if t.numel() >= q.numel()]
    assert large and all(t.untyped_storage().data_ptr() in inputs for t in large), [
        (t.dtype, tuple(t.shape)) for t in large]
    out.float().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v, floor))


@pytest.mark.parametrize('impl', ['torch', pytest.param('triton', marks=needs_triton)])
def test_tokens_with_every_channel_at_the_floor_have_finite_gradients(impl):
    """A token whose q or k is negative everywhere maps to the floor alone (t**3 ~ 1e-18): 1 / ||t**p|| cubed
    overflows float32, so the backward must never form it (it did, and gave NaN in a detector's training)."""
    q, k, v, residual, floor = make_inputs(2, 30, 30, 32, torch.float32, seed=11, requires_grad=False)
    q, k = q.clone(), k.clone()
    q[:, ::4], k[:, 1::5] = -q[:, ::4].abs(), -k[:, 1::5].abs()
    q, k, v, residual, floor = (t.detach().requires_grad_() for t in (q, k, v, residual, floor))
    out = run_focused_linear_attention(q, k, v, floor, 3, 2, residual, attn_impl=impl)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, floor), grad)
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v, floor)]
    ref = spec_attention(*ref_inputs, 3, 2, residual.double())
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad.double())
    for name, g, r in zip(('q', 'k', 'v', 'floor'), grads, ref_grads):
        assert torch.isfinite(g).all(), name
        assert relative_error(g, r) < 1e-3, name


def test_block_diagonal_heads_compile_in_one_graph(monkeypatch):
    """What a GPU compiles in half precision: the block-diagonal heads (their writes into views of the state and
    the backward's output) and the stacked queries and keys trace into one graph, forward and backward, and
    equal eager."""
    force_block_diagonal_heads(monkeypatch, True)
    force_stacked_maps(monkeypatch, True)
    torch.manual_seed(0)
    layer = FocusedLinearAttention(48, num_heads=3, grid_size=(6, 6))
    with torch.no_grad():
        layer.scale.normal_()
        layer.positional_encoding.normal_()
    x = torch.randn(2, 36, 48, requires_grad=True)
    compiled = torch.compile(layer, backend='aot_eager', fullgraph=True)
    out, ref = compiled(x, (6, 6)), layer(x, (6, 6))
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(ref)
    inputs = (x, layer.scale, layer.positional_encoding)
    for g, r in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(ref, inputs, grad)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, (6, 6)), layer(x, (6, 6)))


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_queries_and_keys_of_one_projection_are_focused_in_the_same_passes(monkeypatch, dtype):
    """q and k as the two halves of one projection's output (the models' fused q/k matmul): one max(), one
    power; the result equals that of q and k apart, also when they are overwritten as scratch space. On a GPU
    queries and keys of one size in separate buffers are stacked for the same passes."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class MaxCounter(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            MaxCounter.calls += func.overloadpacket.__name__ == 'maximum'
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(3)
    qk = torch.randn(2, 30, 2 * 24, generator=g).to(dtype)
    v, residual = (torch.randn(2, 30, 24, generator=g).to(dtype) for _ in range(2))
    floor = 1e-6 / F.softplus(torch.randn(24, generator=g))
    key_offset = torch.randn(1, 30, 24, generator=g).to(dtype)
    q, k = qk.chunk(2, dim=-1)
    apart = focused_linear_attention(q.clone(), k.clone(), v, floor, 3, 2, residual, key_offset)
    for overwrite in (False, True):
        scratch, res = qk.clone(), residual.clone()
        MaxCounter.calls = 0
        with torch.no_grad(), MaxCounter():
            out = focused_linear_attention(*scratch.chunk(2, dim=-1), v, floor, 3, 2, res, key_offset,
                                           overwrite_inputs=overwrite)
        # without overwriting, k + key_offset is a new tensor: q and k are no longer halves of one buffer
        assert MaxCounter.calls == (1 if overwrite else 2)
        torch.testing.assert_close(out, apart, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)
    MaxCounter.calls = 0
    with torch.no_grad(), MaxCounter():
        together = focused_linear_attention(q, k, v, floor, 3, 2, residual)
    assert MaxCounter.calls == 1
    torch.testing.assert_close(together, focused_linear_attention(q.clone(), k.clone(), v, floor, 3, 2, residual),
                               rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)
    force_stacked_maps(monkeypatch, True)
    MaxCounter.calls = 0
    with torch.no_grad(), MaxCounter():
        stacked = focused_linear_attention(q.clone(), k.clone(), v, floor, 3, 2, residual, key_offset)
    assert MaxCounter.calls == 1
    torch.testing.assert_close(stacked, apart, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)


@pytest.mark.parametrize('same_size', [True, False])
def test_torch_path_backward_launches_few_ops(monkeypatch, same_size):
    """The backward of one attention layer (one head, bf16, a key offset), counted in ops that launch a kernel,
    as a GPU runs it: queries and keys of one size go through the focusing maps' backward stacked. 88 ops
    before, 56 now (76 for keys of another size), the output's cast and sum included."""
    force_stacked_maps(monkeypatch, True)
    from torch.utils._python_dispatch import TorchDispatchMode
    no_kernel = {'view', '_unsafe_view', 'reshape', 'permute', 'transpose', 't', 'expand', 'slice', 'select',
                 'split', 'unsqueeze', 'squeeze', 'as_strided', 'alias', 'unbind', 'detach', 'diagonal', 'empty',
                 'empty_like', 'new_empty', 'empty_strided'}

    class OpCounter(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            OpCounter.ops += func.overloadpacket.__name__ not in no_kernel
            return func(*args, **(kwargs or {}))

    q, k, v, residual, floor = make_inputs(2, 36, 36 if same_size else 9, 16, torch.bfloat16, seed=1)
    key_offset = torch.zeros(1, k.shape[1], 16, dtype=torch.bfloat16, requires_grad=True)
    out = focused_linear_attention(q, k, v, floor, 3, 1, residual, key_offset)
    with OpCounter():
        out.float().sum().backward()
    assert OpCounter.ops <= (60 if same_size else 80), OpCounter.ops
