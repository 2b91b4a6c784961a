""" The implicit attention of focused linear attention, captured from models, and the visualize command."""
import sys

import pytest
import timm
import torch
from PIL import Image

from flatten_timm.attention_maps import (
    LayerChoiceError, attention_maps, attention_rank, capture_attention, find_linear_attention, figure_size_px,
    implicit_attention)
from flatten_timm.cli import main
from flatten_timm.layers import FocusedLinearAttention2d
from flatten_timm.layers import focusing_map
from test_models import TINY


def _entropy(p):
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


@pytest.mark.parametrize('name', sorted(TINY))
def test_capture_leaves_outputs_unchanged_and_maps_are_distributions(name):
    model = timm.create_model(name, **TINY[name]).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        reference = model(x)
    layer_name, layer = find_linear_attention(model)
    with capture_attention(model, layer) as captured, torch.no_grad():
        out = model(x)
    assert torch.equal(out, reference)
    assert len(captured) == 1 and not layer._forward_hooks  # one call recorded, hook removed after
    c = captured[0]
    for query in (0, c.q.shape[2] // 2, c.q.shape[2] - 1):
        for attn in attention_maps(c, query, head=c.q.shape[1] - 1).values():
            assert attn.shape == c.key_size
            assert (attn >= 0).all()
            torch.testing.assert_close(attn.sum(), torch.tensor(1.), rtol=0, atol=1e-5)


def test_implicit_attention_is_what_the_layer_computes():
    """A @ v with the captured A equals the layer's linear attention of the same v (before the DWC)."""
    torch.manual_seed(0)
    layer = FocusedLinearAttention2d(16, num_heads=2, grid_size=(6, 8), sr_ratio=2).eval()
    with torch.no_grad():
        layer.positional_encoding.normal_()
    x = torch.randn(1, 16, 6, 8)
    with capture_attention(layer, layer) as captured, torch.no_grad():
        layer(x)
        _, _, v, _ = layer.project(x.flatten(2).transpose(1, 2), (6, 8))
    c = captured[0]
    v = v.reshape(1, -1, 2, 8).transpose(1, 2)
    for head in range(2):
        attn = implicit_attention(c.q[0, head], c.k[0, head], c.scale[head], c.focusing_factor)
        phi_q = focusing_map(c.q[0, head], c.scale[head], c.focusing_factor)
        phi_k = focusing_map(c.k[0, head], c.scale[head], c.focusing_factor)
        linear = (phi_q @ (phi_k.T @ v[0, head])) / (phi_q @ phi_k.sum(0, keepdim=True).T)
        torch.testing.assert_close(attn @ v[0, head], linear, rtol=1e-4, atol=1e-5)


def test_focusing_lowers_entropy_for_positive_queries_and_keys():
    torch.manual_seed(0)
    q, k = torch.rand(64, 16), torch.rand(100, 16)
    scale = torch.ones(16)
    focused = implicit_attention(q, k, scale, focusing_factor=3)
    plain = implicit_attention(q, k, scale, focusing_factor=1)
    assert (_entropy(focused) < _entropy(plain)).all()
    assert _entropy(focused).mean() < _entropy(plain).mean() - 0.05


def test_depthwise_conv_restores_rank():
    layer = FocusedLinearAttention2d(32, num_heads=1, grid_size=(8, 8), kernel_size=3)
    with capture_attention(layer, layer) as captured, torch.no_grad():
        layer(torch.randn(1, 32, 8, 8))
    rank = attention_rank(captured[0])
    assert rank['without_dwc'] <= rank['head_dim'] == 32 < rank['with_dwc'] == rank['full'] == 64


def test_layer_choice_errors_are_clear():
    model = timm.create_model('flatten_pvt_tiny', attn_type='LLLS', **TINY['flatten_pvt_tiny'])
    assert find_linear_attention(model, 2, 0)[0] == 'stages.2.blocks.0.attn'
    with pytest.raises(LayerChoiceError, match='stages.3.blocks.0 has no focused linear attention'):
        find_linear_attention(model, 3, 0)


def test_visualize_command_writes_the_figure(tmp_path, capsys):
    image = tmp_path / 'image.png'
    Image.new('RGB', (320, 240), (30, 160, 90)).save(image)
    out = tmp_path / 'maps.png'
    assert main(['visualize', '--model', 'flatten_pvt_v2_b0', '--image', str(image), '--stage', '1',
                 '--head', '1', '--points', '10,20', '200,100', '--output', str(out)]) == 0
    assert Image.open(out).size == figure_size_px(2) == (1200, 900)
    assert main(['visualize', '--model', 'flatten_pvt_v2_b0', '--image', str(image), '--stage', '9',
                 '--output', str(out)]) == 2
    assert 'stages.9.blocks.0 has no focused linear attention' in capsys.readouterr().err
    with pytest.raises(SystemExit, match='has 2 heads'):
        main(['visualize', '--model', 'flatten_pvt_v2_b0', '--image', str(image), '--stage', '1',
              '--head', '5', '--output', str(out)])


def test_visualize_without_matplotlib_names_the_extra(tmp_path, monkeypatch, capsys):
    image = tmp_path / 'cat.png'
    Image.new('RGB', (64, 64)).save(image)
    for name in [m for m in list(sys.modules) if m == 'matplotlib' or m.startswith('matplotlib.')]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # import matplotlib raises ImportError
    assert main(['visualize', '--model', 'flatten_pvt_v2_b0', '--image', str(image),
                 '--output', str(tmp_path / 'maps.png')]) == 2
    err = capsys.readouterr().err
    assert "pip install 'flatten-timm[viz]'" in err and 'matplotlib' in err
    assert not (tmp_path / 'maps.png').exists()
