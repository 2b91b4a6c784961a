""" FocusedLinearAttention against a literal transcription of the paper's equations (layers/fla/spec.py)."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten

from flatten_timm.layers import FocusedLinearAttention


def spec_reference(attn: FocusedLinearAttention, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Step by step as the spec states it, heads handled one by one, dwc applied per head."""
    B, N, C = x.shape
    h, d = attn.num_heads, C // attn.num_heads
    if attn.qkv is not None:
        q, k, v = attn.qkv(x).reshape(B, N, 3, C).unbind(2)
    else:
        q = attn.q(x)
        kv_in, _ = attn.sr(x, (H, W))
        k, v = attn.kv(kv_in).reshape(B, -1, 2, C).unbind(2)
    n = k.shape[1]
    k = k + attn.positional_encoding
    s = F.softplus(attn.scale)
    q, k = (F.relu(q) + 1e-6) / s, (F.relu(k) + 1e-6) / s
    p = attn.focusing_factor
    q = q ** p / (q ** p).norm(dim=-1, keepdim=True) * q.norm(dim=-1, keepdim=True)
    k = k ** p / (k ** p).norm(dim=-1, keepdim=True) * k.norm(dim=-1, keepdim=True)
    outs = []
    for i in range(h):
        qi, ki, vi = (t[..., i * d:(i + 1) * d] for t in (q, k, v))
        z = 1 / (qi @ ki.mean(dim=1, keepdim=True).transpose(1, 2) + 1e-6)
        out = qi @ (ki.transpose(1, 2) @ vi / n) * z
        vi = vi.transpose(1, 2)  # B, d, n
        if n != N:
            vi = F.interpolate(vi, size=N, mode='linear')
        outs.append(out + attn.dwc(vi.reshape(B, d, H, W)).reshape(B, d, N).transpose(1, 2))
    return attn.proj(torch.cat(outs, dim=-1))


def _randomize(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)


@pytest.mark.parametrize('sr_ratio,pool_size', [(1, None), (2, None), (4, None), (1, 3)])
@pytest.mark.parametrize('focusing_factor,kernel_size', [(3, 5), (2, 3)])
def test_matches_the_spec(sr_ratio, pool_size, focusing_factor, kernel_size):
    H, W = 8, 12
    attn = FocusedLinearAttention(32, num_heads=4, grid_size=(H, W), sr_ratio=sr_ratio, pool_size=pool_size,
                                  focusing_factor=focusing_factor, kernel_size=kernel_size)
    _randomize(attn)
    x = torch.randn(2, H * W, 32)
    torch.testing.assert_close(attn(x, (H, W)), spec_reference(attn, x, H, W), rtol=1e-5, atol=1e-5)


def test_positional_encoding_follows_the_key_grid():
    attn = FocusedLinearAttention(16, 2, grid_size=(8, 8), sr_ratio=2)
    assert attn.positional_encoding.shape == (1, 16, 16)
    pooled = FocusedLinearAttention(16, 2, grid_size=(8, 8), pool_size=7)
    assert pooled.positional_encoding.shape == (1, 49, 16)
    # pooled keys keep 7x7 whatever the input size
    assert pooled(torch.randn(1, 20 * 30, 16), (20, 30)).shape == (1, 600, 16)


def test_other_grid_resizes_positional_encoding_and_caches_it_for_inference():
    attn = FocusedLinearAttention(16, 2, grid_size=(8, 8)).eval()
    _randomize(attn)
    x = torch.randn(1, 10 * 6, 16)
    torch.testing.assert_close(  # the table resized bilinearly, as the released models do
        attn.key_positional_encoding((10, 6)).reshape(1, 10, 6, 16),
        F.interpolate(attn.positional_encoding.reshape(1, 8, 8, 16).permute(0, 3, 1, 2), size=(10, 6),
                      mode='bilinear', align_corners=False).permute(0, 2, 3, 1))
    with torch.no_grad():
        out = attn(x, (10, 6))
        inv_scale = 1 / F.softplus(attn.scale.reshape(-1))
        pe = attn._scaled_key_encoding((10, 6), inv_scale, torch.float32)
        assert pe is attn._scaled_key_encoding((10, 6), inv_scale, torch.float32)  # no re-allocation per call
        attn.positional_encoding.add_(1.0)  # a weight update invalidates the cache
        assert not torch.equal(attn._scaled_key_encoding((10, 6), inv_scale, torch.float32), pe)
    assert out.shape == x.shape and torch.isfinite(out).all()
    # with gradients the resize is part of the graph
    attn(x, (10, 6)).sum().backward()
    assert attn.positional_encoding.grad.abs().sum() > 0


@pytest.mark.parametrize('path', ['folded', 'scaled'])
def test_tables_of_large_grids_are_kept_up_to_the_layers_limit(path, monkeypatch):
    """A key encoding resized to another grid is kept only up to the layer's max_cached_table_elements (FLatten-DeiT
    sets one: kept in each of its blocks at a large image, the tables would outweigh the inference's own memory);
    without a limit, and at the grid it was learned at, it is kept at any size. So on both inference paths: the
    folded projections' (a scaled table) and the one pass's (the table as it is)."""
    from flatten_timm.layers.parameter_cache import MAX_CACHED_TABLE_ELEMENTS
    from flatten_timm.models.flatten_deit import FlattenDeitAttention
    _set_folded_projection_limit(monkeypatch, path)
    small, large = (10, 6), (130, 130)  # 960 and 270,400 rows x channels, the limit between them
    assert small[0] * small[1] * 16 <= MAX_CACHED_TABLE_ELEMENTS < large[0] * large[1] * 16
    assert FlattenDeitAttention(16, 2, grid_size=(8, 8)).max_cached_table_elements == MAX_CACHED_TABLE_ELEMENTS
    limited = FocusedLinearAttention(16, 2, grid_size=(8, 8), max_cached_table_elements=MAX_CACHED_TABLE_ELEMENTS)
    unlimited = FocusedLinearAttention(16, 2, grid_size=(8, 8))
    learned_large = FocusedLinearAttention(16, 2, grid_size=large, max_cached_table_elements=MAX_CACHED_TABLE_ELEMENTS)

    def key(size):
        return (*size, torch.float32) if path == 'folded' else ('key encoding', *size)
    with torch.no_grad():
        for attn in (limited.eval(), unlimited.eval(), learned_large.eval()):
            for size in (small, large):
                attn(torch.randn(1, size[0] * size[1], 16), size)
        assert key(small) in limited._folded._entries
        assert key(large) not in limited._folded._entries
        assert key(large) in unlimited._folded._entries
        # at its training grid: a scaled copy of the parameter, or the parameter itself
        assert (key(large) in learned_large._folded._entries) == (path == 'folded')
        # recomputed on every call, in its own buffer: the parameter stays as it was
        _randomize(limited)
        table = limited.positional_encoding.clone()
        x = torch.randn(1, large[0] * large[1], 16)
        fast = limited(x, large)
        limited.attn_impl = 'reference'
        torch.testing.assert_close(fast, limited(x, large), rtol=1e-3, atol=5e-5)
        assert torch.equal(limited.positional_encoding, table)


def _set_folded_projection_limit(monkeypatch, path: str):
    """Make every layer take one inference path on the CPU: 'folded' projections or the 'scaled' pass."""
    import importlib
    fla = importlib.import_module('flatten_timm.layers.fla.modules')
    monkeypatch.setattr(fla, 'FOLDED_PROJECTION_MAX_ELEMENTS', 2 ** 62 if path == 'folded' else 0)


def test_autocast_bf16_is_finite():
    attn = FocusedLinearAttention(32, 4, grid_size=(8, 8))
    _randomize(attn)
    x = (torch.randn(2, 64, 32) * 20).requires_grad_()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = attn(x, (8, 8))
    out.float().sum().backward()
    assert torch.isfinite(out.float()).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize('sr_ratio', [1, 2])
def test_inference_reuses_what_it_folds_from_the_parameters(sr_ratio, monkeypatch):
    """Folded projections, mixing kernel and scaled key encoding are computed once for inference, and again
    whenever a parameter changes (in place, loaded, moved or cast); with gradients they are in the graph."""
    import copy
    import importlib
    import pickle
    fla = importlib.import_module('flatten_timm.layers.fla.modules')
    folds = []
    fold = fla._fold_kernel_into
    monkeypatch.setattr(fla, '_fold_kernel_into', lambda *args: folds.append(1) or fold(*args))

    attn = FocusedLinearAttention(16, 2, grid_size=(6, 6), sr_ratio=sr_ratio).eval()
    _randomize(attn)
    x = torch.randn(2, 8 * 10, 16)

    def fresh():  # with gradients recorded nothing is reused
        with torch.enable_grad():
            return attn(x, (8, 10)).detach()

    per_call = 1 if sr_ratio == 1 else 2  # a fused qkv, or q and kv
    with torch.no_grad():
        out = attn(x, (8, 10))
        assert len(folds) == per_call
        torch.testing.assert_close(attn(x, (8, 10)), out, rtol=0, atol=0)
        assert len(folds) == per_call  # reused
        torch.testing.assert_close(out, fresh(), rtol=1e-5, atol=1e-5)  # training rounds its own way

        attn.scale.add_(0.5)  # an optimizer step or any in-place update
        torch.testing.assert_close(attn(x, (8, 10)), fresh(), rtol=1e-5, atol=1e-5)
        other = FocusedLinearAttention(16, 2, grid_size=(6, 6), sr_ratio=sr_ratio)
        _randomize(other)
        attn.load_state_dict(other.state_dict())
        torch.testing.assert_close(attn(x, (8, 10)), other(x, (8, 10)), rtol=1e-5, atol=1e-5)

        attn.half()  # a move clears the cache: the float storages freed here may come back at the same address
        assert len(attn._folded) == 0
        attn.float()  # rounded through half: a stale entry would give the values before the rounding
        torch.testing.assert_close(attn(x, (8, 10)), fresh(), rtol=1e-5, atol=1e-5)

        with torch.autocast('cpu', dtype=torch.bfloat16):  # its own entry, in the autocast dtype
            low = attn(x, (8, 10))
            assert low.dtype == torch.bfloat16 and torch.bfloat16 in attn._folded._entries
            torch.testing.assert_close(low, fresh(), rtol=0, atol=0)

    assert len(copy.deepcopy(attn)._folded) == 0 and len(pickle.loads(pickle.dumps(attn))._folded) == 0
    attn(x, (8, 10)).sum().backward()  # training: gradients reach the parameters folded into the projections
    assert attn.scale.grad.abs().sum() > 0 and attn.dwc.weight.grad.abs().sum() > 0


def test_only_wide_layers_apply_the_scale_by_a_pass():
    """Layers up to 256 channels keep folded projections (a pass over their q and k costs relatively most, the copy
    little); wider ones apply the scale by a pass on a CPU in the parameters' dtype, and fold everywhere else."""
    from flatten_timm.layers.fla.modules import FOLDED_PROJECTION_MAX_ELEMENTS
    narrow, wide = FocusedLinearAttention(256, 4), FocusedLinearAttention(264, 4)
    assert 2 * 256 ** 2 == FOLDED_PROJECTION_MAX_ELEMENTS
    x = torch.randn(1, 16, 264)
    with torch.no_grad():
        assert not narrow._scales_in_a_pass(torch.randn(1, 16, 256)) and wide._scales_in_a_pass(x)
        assert not wide._scales_in_a_pass(x.double())  # not the parameters' dtype
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert not wide._scales_in_a_pass(x)
        assert not wide._scales_in_a_pass(x.to('meta'))  # not a CPU
    assert not wide._scales_in_a_pass(x)  # training


@pytest.mark.parametrize('sr_ratio', [1, 2])
def test_the_scaling_pass_keeps_no_copy_of_the_projections(sr_ratio, monkeypatch):
    """Inference that applies the kernel's 1 / s and shift to q and k by one pass keeps no projections with them
    folded in (two thirds of every qkv weight): what it keeps are views of the parameters and vectors (here: the
    scales and floors, the mixing kernel repeated per head and its bias, the key encoding resized to the key
    grid); its output is the folded path's (training's) and the spec's."""
    _set_folded_projection_limit(monkeypatch, 'scaled')
    C, heads = 32, 4
    attn = FocusedLinearAttention(C, heads, grid_size=(6, 6), sr_ratio=sr_ratio).eval()
    _randomize(attn)
    x = torch.randn(2, 8 * 10, C)
    with torch.no_grad():
        out = attn(x, (8, 10))
    parameter_storages = {p.untyped_storage().data_ptr() for p in attn.parameters()}
    kept = [t for entry in attn._folded._entries.values() for t in tree_flatten(entry[1])[0]
            if isinstance(t, torch.Tensor)]
    copies = [t for t in kept if t.untyped_storage().data_ptr() not in parameter_storages]
    scales = (2 if sr_ratio == 1 else 1) * 2 * C
    keys = 8 * 10 if sr_ratio == 1 else 4 * 5  # the key encoding resized from 6 x 6 (or 3 x 3) to the key grid
    expected = scales + attn.dwc.weight.numel() * heads + C + keys * C
    assert sum(t.numel() for t in copies) == expected, [tuple(t.shape) for t in copies]
    torch.testing.assert_close(out, attn(x, (8, 10)).detach(), rtol=1e-5, atol=1e-5)  # the folded path
    attn.attn_impl = 'reference'
    torch.testing.assert_close(out, attn(x, (8, 10)).detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('sr_ratio', [1, 2])
def test_the_scaling_pass_in_half_precision_parameters(dtype, sr_ratio, monkeypatch):
    """A model converted to bf16 / fp16 (no autocast) takes the pass in its own dtype, as accurate as the folded
    path (training's) against the float64 spec of the same rounded parameters, FLatten-DeiT's class token
    included."""
    import copy
    from flatten_timm.models.flatten_deit import FlattenDeitAttention
    _set_folded_projection_limit(monkeypatch, 'scaled')
    layers = [(FocusedLinearAttention(32, 4, grid_size=(6, 6), sr_ratio=sr_ratio), 0)]
    if sr_ratio == 1:
        layers.append((FlattenDeitAttention(32, 4, grid_size=(6, 6)), 1))
    for attn, prefix in layers:
        _randomize(attn)
        attn.to(dtype).eval()
        spec = copy.deepcopy(attn).double()
        spec.attn_impl = 'reference'
        x = torch.randn(2, prefix + 8 * 10, 32, dtype=dtype)
        with torch.no_grad():
            assert attn._scales_in_a_pass(x)
            out = attn(x, (8, 10))
            expected = spec(x.double(), (8, 10))
        folded = attn(x, (8, 10)).detach()

        def error(t):
            return float((t.double() - expected).norm() / expected.norm())
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert error(out) < (0.01 if dtype == torch.bfloat16 else 0.002)
        assert error(out) < 1.2 * error(folded), (error(out), error(folded))


def test_parameter_cache_keeps_the_recent_keys_only():
    """A detector fed ever new sizes keeps the resized tables of its recent sizes, not of all."""
    from flatten_timm.layers.parameter_cache import ParameterCache
    cache, table, computed = ParameterCache(max_entries=3), torch.zeros(4), []
    with torch.no_grad():
        for key in (1, 2, 3, 1, 4):  # 1 used again: 2 is the least recently used when 4 comes
            cache.get(key, (table,), lambda: computed.append(key) or key)
        assert list(cache._entries) == [3, 1, 4] and computed == [1, 2, 3, 4]
        cache.get(2, (table,), lambda: computed.append(2) or 2)
        assert computed[-1] == 2 and len(cache) == 3
    attn = FocusedLinearAttention(16, 2, grid_size=(4, 4)).eval()
    with torch.no_grad():
        for size in range(5, 30):
            attn(torch.randn(1, size * 3, 16), (size, 3))
    assert len(attn._folded) <= attn._folded.max_entries


def test_swin_keeps_the_shift_masks_of_its_recent_map_sizes_only():
    """Shift masks are cached per map size (an LruCache): a detector fed ever new image sizes must not pile
    them up (at 800x1344 one stage-1 mask is 13 MB)."""
    import timm
    from test_models import TINY
    model = timm.create_model('flatten_swin_tiny_patch4_224', **TINY['flatten_swin_tiny_patch4_224']).eval()
    blocks = [m for m in model.modules() if hasattr(m, '_mask_cache')]
    with torch.no_grad():
        for width in range(64, 64 + 32 * 20, 32):  # a new window count in the shifted stage each time
            model(torch.randn(1, 3, 64, width))
    assert blocks and max(len(b._mask_cache) for b in blocks) == blocks[0]._mask_cache.max_entries
