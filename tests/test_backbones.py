""" Detector use: stage features at any input size, the channels-first attention module, a torchvision detector."""
import math

import pytest
import timm
import torch

from flatten_timm.detection import C2fFocusedAttention, FlattenFPNBackbone
from flatten_timm.layers import FocusedLinearAttention, FocusedLinearAttention2d
from test_models import TINY

ODD_SIZES = [(333, 517), (480, 640), (800, 1333), (65, 97)]


@pytest.mark.parametrize('name', sorted(TINY))
def test_features_at_224_match_intermediates_and_the_classifier_path(name):
    torch.manual_seed(0)
    model = timm.create_model(name, **TINY[name]).eval()
    torch.manual_seed(0)
    features = timm.create_model(name, features_only=True, out_indices=(0, 1, 2, 3), **TINY[name]).eval()
    stage_outputs = []
    hooks = [stage.register_forward_hook(lambda m, i, o: stage_outputs.append(o)) for stage in model.stages]
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        maps = features(x)
        logits = model(x)
        intermediates = model.forward_intermediates(x, intermediates_only=True)
    for h in hooks:
        h.remove()
    assert torch.isfinite(logits).all()
    info = features.feature_info
    assert [tuple(f.shape[1:]) for f in maps] == [(c, 224 // r, 224 // r) for c, r in
                                                 zip(info.channels(), info.reduction())]
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    for f, i, s in zip(maps, intermediates, stage_outputs):
        s = s.permute(0, 3, 1, 2) if s.shape[1] != f.shape[1] else s  # Swin stages are NHWC
        torch.testing.assert_close(f, i, rtol=0, atol=0)
        torch.testing.assert_close(f, s, rtol=0, atol=0)


@pytest.mark.parametrize('name', sorted(TINY))
def test_features_at_odd_sizes(name):
    model = timm.create_model(name, features_only=True, **TINY[name]).eval()
    for h, w in ODD_SIZES:
        with torch.no_grad():
            maps = model(torch.randn(1, 3, h, w))
        for f, c, r in zip(maps, model.feature_info.channels(), model.feature_info.reduction()):
            assert f.shape == (1, c, math.ceil(h / r), math.ceil(w / r)), (h, w, r)
            assert torch.isfinite(f).all()


@pytest.mark.parametrize('name', sorted(TINY))
def test_classifier_at_odd_sizes_and_pruned_intermediates(name):
    model = timm.create_model(name, num_classes=5, **TINY[name]).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 333, 517)).shape == (2, 5)
        full = model.forward_intermediates(torch.randn(1, 3, 96, 160), indices=[1, 2], intermediates_only=True)
    x = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        before = model.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
    kept = model.prune_intermediate_layers([1, 2], prune_head=True)
    assert len(model.stages) == 3 and kept == [1, 2]
    with torch.no_grad():
        after = model.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
    assert [f.shape for f in full] == [f.shape for f in after]
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_resized_position_tables_are_cached_for_inference():
    model = timm.create_model('flatten_pvt_tiny', **TINY['flatten_pvt_tiny']).eval()
    stage, attn = model.stages[0], model.stages[0].blocks[0].attn
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        out = model(x)
        inv_scale = 1 / torch.nn.functional.softplus(attn.scale.reshape(-1))
        pos = stage._resize_pos_embed(stage.pos_embed, (24, 32))
        pe = attn._scaled_key_encoding((3, 4), inv_scale, x.dtype)
        assert model(x).equal(out)
        # the same tensors come back: nothing is recomputed while the weights are unchanged
        assert stage._resize_pos_embed(stage.pos_embed, (24, 32)) is pos
        assert attn._scaled_key_encoding((3, 4), inv_scale, x.dtype) is pe
        stage.pos_embed.add_(1)  # a weight update invalidates the cache
        assert stage._resize_pos_embed(stage.pos_embed, (24, 32)) is not pos
    # training always resizes from the parameter, so gradients reach it
    model.train()
    model(x).sum().backward()
    assert stage.pos_embed.grad.abs().sum() > 0 and attn.positional_encoding.grad.abs().sum() > 0


def test_too_small_inputs_fail_clearly():
    model = timm.create_model('flatten_swin_tiny_patch4_224', features_only=True,
                              **TINY['flatten_swin_tiny_patch4_224'])
    with pytest.raises(ValueError, match='at least 32x32'):
        model(torch.randn(1, 3, 24, 320))


# ---- FocusedLinearAttention2d -----------------------------------------------------------------------

def test_attention_2d_equals_the_token_core_on_the_same_weights():
    torch.manual_seed(0)
    attn2d = FocusedLinearAttention2d(32, num_heads=4, grid_size=(6, 10), sr_ratio=2).eval()
    core = FocusedLinearAttention(32, num_heads=4, grid_size=(6, 10), sr_ratio=2).eval()
    with torch.no_grad():
        attn2d.positional_encoding.normal_()
        attn2d.scale.normal_()
    core.load_state_dict(attn2d.state_dict())
    for h, w in [(6, 10), (13, 7), (20, 33)]:
        x = torch.randn(2, 32, h, w)
        with torch.no_grad():
            tokens = core(x.flatten(2).transpose(1, 2).contiguous(), (h, w))
            out = attn2d(x)
        assert out.shape == x.shape
        torch.testing.assert_close(out, tokens.transpose(1, 2).reshape(2, 32, h, w), rtol=0, atol=0)


def test_attention_2d_learns_its_positional_encoding_on_non_square_maps():
    attn = FocusedLinearAttention2d(16, num_heads=2, grid_size=(20, 20))
    assert isinstance(attn.positional_encoding, torch.nn.Parameter)
    assert 'positional_encoding' in dict(attn.named_parameters())
    x = torch.randn(2, 16, 15, 27, requires_grad=True)
    out = attn(x)
    out.square().mean().backward()
    assert out.shape == x.shape
    assert attn.positional_encoding.grad is not None and attn.positional_encoding.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0


def test_attention_2d_under_autocast_and_channels_last():
    attn = FocusedLinearAttention2d(16, num_heads=2, grid_size=(8, 8))
    x = torch.randn(2, 16, 9, 12).to(memory_format=torch.channels_last)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = attn(x)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert all(torch.isfinite(p.grad).all() for p in attn.parameters() if p.grad is not None)


def test_attention_2d_bad_input_fails_clearly():
    attn = FocusedLinearAttention2d(16, num_heads=2, sr_ratio=4)
    with pytest.raises(ValueError, match=r'expects a \(B, 16, H, W\) map'):
        attn(torch.randn(1, 8, 10, 10))
    with pytest.raises(ValueError, match='smaller than sr_ratio=4'):
        attn(torch.randn(1, 16, 3, 10))


def test_c2f_neck_block():
    block = C2fFocusedAttention(24, 32, n=2, num_heads=2, grid_size=(10, 10))
    x = torch.randn(2, 24, 10, 17)
    out = block(x)
    out.mean().backward()
    assert out.shape == (2, 32, 10, 17)
    assert all(p.grad is not None for p in block.parameters())


# ---- torchvision detector -----------------------------------------------------------------------

@pytest.mark.parametrize('name', ['flatten_pvt_v2_b0', 'flatten_swin_tiny_patch4_224'])
def test_faster_rcnn_trains_and_detects(name):
    from torchvision.models.detection import FasterRCNN
    torch.manual_seed(0)
    backbone = FlattenFPNBackbone(name, fpn_channels=32, **TINY[name])
    detector = FasterRCNN(backbone, num_classes=3, min_size=128, max_size=192,
                          rpn_batch_size_per_image=32, box_batch_size_per_image=16)
    images = [torch.rand(3, 120, 170), torch.rand(3, 150, 110)]
    targets = [
        {'boxes': torch.tensor([[10., 20., 80., 90.], [50., 30., 160., 110.]]), 'labels': torch.tensor([1, 2])},
        {'boxes': torch.tensor([[5., 5., 60., 100.]]), 'labels': torch.tensor([1])},
    ]
    detector.train()
    losses = detector(images, targets)
    assert set(losses) == {'loss_classifier', 'loss_box_reg', 'loss_objectness', 'loss_rpn_box_reg'}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    backbone_grads = [p.grad for p in backbone.body.parameters() if p.requires_grad]
    assert all(g is not None for g in backbone_grads) and sum(g.abs().sum() for g in backbone_grads) > 0

    detector.eval()
    with torch.no_grad():
        detections = detector(images)
    assert len(detections) == 2
    for d in detections:
        assert set(d) == {'boxes', 'labels', 'scores'} and d['boxes'].shape[1:] == (4,)


@pytest.mark.parametrize('name', sorted(TINY))
def test_fx_feature_extraction_matches_the_getter(name):
    """features_only with feature_cls='fx' (a torch.fx graph cut at the stage outputs) at a non-square size.

    As with timm's own Swin, the graph returns the stages' own layout (NHWC for Swin) and says so.
    """
    torch.manual_seed(0)
    fx = timm.create_model(name, **TINY[name], features_only=True, feature_cls='fx').eval()
    getter = timm.create_model(name, **TINY[name], features_only=True).eval()
    getter.load_state_dict({k.replace('graph_module.', 'model.', 1): v for k, v in fx.state_dict().items()})
    x = torch.randn(1, 3, 72, 104)
    with torch.no_grad():
        fx_maps, maps = fx(x), getter(x)
    if str(fx.output_fmt.value) == 'NHWC':
        assert name.startswith('flatten_swin')
        fx_maps = [m.permute(0, 3, 1, 2) for m in fx_maps]
    assert [m.shape for m in fx_maps] == [m.shape for m in maps]
    for a, b in zip(fx_maps, maps):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
