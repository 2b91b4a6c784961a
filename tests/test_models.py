""" The zoo: every registered model builds and runs, sizes match the paper, the timm API behaves."""
import ast
from pathlib import Path

import pytest
import timm
import torch

from flatten_timm.models.flatten_cswin import LePEFocusedLinearAttention
from flatten_timm.zoo import describe_model

# parameters (M) and GMACs of the official models, as the FLatten paper and its repository report them
SPEC = {
    'flatten_pvt_tiny': (12.15, 2.04), 'flatten_pvt_small': (21.67, 4.03),
    'flatten_pvt_medium': (37.24, 7.04), 'flatten_pvt_large': (50.65, 10.38),
    'flatten_pvt_v2_b0': (3.59, 0.58), 'flatten_pvt_v2_b1': (12.93, 2.22), 'flatten_pvt_v2_b2': (22.55, 4.25),
    'flatten_pvt_v2_b3': (38.27, 7.28), 'flatten_pvt_v2_b4': (51.84, 10.68), 'flatten_pvt_v2_b5': (67.06, 12.44),
    'flatten_swin_tiny_patch4_224': (29.19, 4.48), 'flatten_swin_small_patch4_224': (50.51, 8.73),
    'flatten_swin_base_patch4_224': (88.97, 15.42), 'flatten_swin_base_patch4_384': (91.43, 46.38),
    'flatten_cswin_tiny_224': (21.20, 4.32), 'flatten_cswin_small_224': (35.45, 6.78),
    'flatten_cswin_base_224': (74.87, 14.91), 'flatten_cswin_base_384': (78.37, 46.30),
}

# small variants of each family for behaviour tests (the architecture is the same, only narrower)
TINY = {
    'flatten_pvt_tiny': dict(embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), depths=(1, 1, 1, 1), img_size=64),
    'flatten_pvt_v2_b0': dict(embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), depths=(1, 1, 1, 1), img_size=64),
    'flatten_swin_tiny_patch4_224': dict(embed_dim=16, num_heads=(1, 2, 4, 8), depths=(1, 2, 2, 1), img_size=64,
                                         window_size=8, softmax_window_size=2),
    'flatten_cswin_tiny_224': dict(embed_dim=16, num_heads=(2, 2, 4, 8), depths=(1, 1, 2, 1), img_size=64,
                                   split_size=(1, 2, 2, 2)),
}


def tiny(name, **kwargs):
    return timm.create_model(name, **{**TINY[name], **kwargs})


# FLatten-DeiT has no official model to match (the authors never released it): tests/test_deit.py covers it
DEIT = ['flatten_deit_tiny_patch16_224', 'flatten_deit_small_patch16_224', 'flatten_deit_base_patch16_224']


def test_all_models_registered():
    assert sorted(timm.list_models('flatten_*')) == sorted([*SPEC, *DEIT])


def merged_lepe_gmacs(name: str) -> float:
    """GMACs of CSWin's LePE convs in its focused linear blocks, counted by the official code; here they run
    inside the rank-restoring depthwise conv (one conv with the sum of both kernels) and cost nothing more."""
    macs = 0
    for module in timm.create_model(name, device='meta').modules():
        if isinstance(module, LePEFocusedLinearAttention):
            macs += module.lepe.weight[0].numel() * module.dim * module.key_grid_size[0] * module.key_grid_size[1]
    return macs / 1e9


@pytest.mark.parametrize('name', sorted(SPEC))
def test_params_and_gmacs_match_the_paper(name):
    entry = describe_model(name)
    params, gmacs = SPEC[name]
    assert round(entry.params_m, 2) == params
    assert entry.gmacs == pytest.approx(gmacs - merged_lepe_gmacs(name), abs=0.006)


@pytest.mark.parametrize('name', sorted(SPEC))
def test_builds_and_runs_at_default_size(name):
    model = timm.create_model(name, num_classes=7).eval()
    size = model.pretrained_cfg['input_size']
    with torch.no_grad():
        out = model(torch.randn(1, *size))
    assert out.shape == (1, 7) and torch.isfinite(out).all()
    cfg = model.pretrained_cfg
    assert cfg['interpolation'] == 'bicubic' and cfg['classifier'] == 'head'
    assert model.get_submodule(cfg['first_conv']).weight.shape[1] == 3
    assert 'arXiv:2308.00442' in cfg['paper_ids']


def test_eval_transform_follows_the_official_protocol():
    """Square resize to size / 0.875 then centre crop; the 384 Swin-B fine-tune resizes straight to 384."""
    from timm.data import resolve_data_config
    cfg = resolve_data_config(model=timm.create_model('flatten_pvt_tiny', device='meta'))
    assert (cfg['crop_pct'], cfg['crop_mode'], cfg['interpolation']) == (0.875, 'squash', 'bicubic')
    cfg = resolve_data_config(model=timm.create_model('flatten_swin_base_patch4_384', device='meta'))
    assert (cfg['input_size'], cfg['crop_pct']) == ((3, 384, 384), 1.0)


@pytest.mark.parametrize('name', sorted(TINY))
def test_grad_checkpointing_gives_identical_outputs_and_gradients(name):
    model = tiny(name, num_classes=5, drop_path_rate=0.)  # training mode, no randomness
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    out.sum().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out_ckpt = model(x)
    out_ckpt.sum().backward()
    torch.testing.assert_close(out_ckpt, out, rtol=0, atol=0)
    for k, p in model.named_parameters():
        if k in grads:
            torch.testing.assert_close(p.grad, grads[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', sorted(TINY))
def test_head_api(name):
    model = tiny(name, num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    features = model.forward_features(x)
    pooled = model.forward_head(features, pre_logits=True)
    assert pooled.shape == (2, model.num_features)
    torch.testing.assert_close(model.forward_head(features), model.get_classifier()(pooled))

    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.num_classes == 3
    model.reset_classifier(0, '')
    unpooled = model(x)
    assert unpooled.shape == features.shape

    names = {n for n, _ in model.named_parameters()}
    assert set(model.no_weight_decay()) <= names
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert sum(len(v) for v in groups.values()) == len(names)


@pytest.mark.parametrize('name', sorted(TINY))
def test_feature_info_matches_stage_outputs(name):
    torch.manual_seed(1)
    model = tiny(name).eval()
    torch.manual_seed(1)
    features = timm.create_model(name, features_only=True, **TINY[name]).eval()  # the same weights
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, stages = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
    assert [f.shape[1] for f in stages] == [i['num_chs'] for i in model.feature_info]
    assert [64 // f.shape[-1] for f in stages] == [i['reduction'] for i in model.feature_info]
    assert features.feature_info.channels() == [i['num_chs'] for i in model.feature_info]
    with torch.no_grad():
        for a, b in zip(features(x), stages):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize('name', sorted(TINY))
def test_bad_input_gives_a_clear_error(name):
    model = tiny(name).eval()
    with pytest.raises(ValueError, match='expects 3 input channels but got 1'):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match='at least 32x32 pixels'):
        model(torch.randn(1, 3, 16, 64))
    with pytest.raises(ValueError, match=r'\(batch, channels, height, width\)'):
        model(torch.randn(3, 64, 64))


def test_bad_hyper_parameters_give_a_clear_error():
    with pytest.raises(ValueError, match="attn_type must be 'L'"):
        timm.create_model('flatten_pvt_tiny', attn_type='LLLX')
    with pytest.raises(ValueError, match='needs 4 values'):
        timm.create_model('flatten_swin_tiny_patch4_224', attn_type='LLS')
    with pytest.raises(ValueError, match='divisible by num_heads'):
        timm.create_model('flatten_pvt_tiny', num_heads=(1, 2, 5, 7))
    with pytest.raises(RuntimeError, match='Unknown model'):
        timm.create_model('flatten_pvt_huge')


def test_architecture_overrides_reach_the_layers():
    model = timm.create_model(
        'flatten_pvt_v2_b0', embed_dims=(16, 32, 48, 64), depths=(1, 2, 1, 1), num_heads=(1, 2, 3, 4),
        attn_type='LLLS', la_sr_ratios='8421', focusing_factor=2, kernel_size=3, mlp_ratios=(2, 2, 2, 2))
    attn = model.stages[0].blocks[0].attn
    assert (attn.focusing_factor, attn.dwc.kernel_size, attn.sr.sr_ratio) == (2, (3, 3), 8)
    assert type(model.stages[3].blocks[0].attn).__name__ == 'SpatialReductionAttention'
    assert len(model.stages[1].blocks) == 2
    swin = timm.create_model('flatten_swin_tiny_patch4_224', window_size=28, attn_type='LLLS', depths=(2, 2, 2, 2))
    assert swin.stages[0].blocks[1].target_window == (28, 28) and swin.stages[0].blocks[1].target_shift == (14, 14)
    cswin = timm.create_model('flatten_cswin_tiny_224', split_size=(1, 2, 14, 7), attn_type='LLSS')
    assert cswin.stages[2].blocks[0].attn.num_branches == 1


def test_library_never_prints():
    for path in (Path(__file__).resolve().parents[1] / 'flatten_timm').rglob('*.py'):
        if path.name == 'cli.py':
            continue  # the command line's output is its job
        tree = ast.parse(path.read_text())
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, 'id', None) == 'print']
        assert not calls, f'print() in {path}'
