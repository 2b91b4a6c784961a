""" FLatten-DeiT: the class-token attention against the paper's equations, the models at any size, the timm API,
compile, ONNX, the warm start from softmax weights and a short training run."""
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from flatten_timm.layers import resample_grid_tokens, set_attn_impl
from flatten_timm.models.flatten_deit import FlattenDeitAttention, warm_start_from_softmax
from conftest import load_script

# a narrow, shallow FLatten-DeiT: the architecture of the registered ones
TINY_DEIT = dict(embed_dim=32, depth=2, num_heads=2, img_size=64)


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """One CPU thread: tiny models' ops are too small to share, and on a busy machine threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_deit(**kwargs):
    return timm.create_model('flatten_deit_tiny_patch16_224', **{**TINY_DEIT, **kwargs})


# ---- the attention against a float64 transcription of the equations ---------------------------------------------

def transcribed_attention(attn: FlattenDeitAttention, x: torch.Tensor, feat_size, num_prefix: int) -> torch.Tensor:
    """The paper's focused linear attention in float64, as an explicit attention matrix: every token a query and a key;
    the key positional encoding on the patch keys; the depthwise conv of V on the patch grid for patch tokens only."""
    x = x.double()
    H, W = feat_size
    B, N, C = x.shape
    heads = attn.num_heads
    d = C // heads
    qkv = x @ attn.qkv.weight.double().t() + attn.qkv.bias.double()
    q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
    # the patch keys' table resized to the grid (the resize is tested elsewhere)
    encoding = resample_grid_tokens(attn.positional_encoding, attn.key_grid_size, (H, W)).double()
    k = torch.cat([k[:, :num_prefix], k[:, num_prefix:] + encoding], dim=1)
    s = F.softplus(attn.scale.double()).reshape(C)

    def phi(t):  # phi_p(t) = ||t'|| t'^p / ||t'^p||, t' = (relu(t) + 1e-6) / s, norms over all C channels
        t = (torch.relu(t) + 1e-6) / s
        return t.norm(dim=-1, keepdim=True) * t ** attn.focusing_factor / (t ** attn.focusing_factor).norm(
            dim=-1, keepdim=True)

    q, k = phi(q), phi(k)
    out = torch.empty_like(v)
    for h in range(heads):  # the N x N attention matrix, which the linear form never builds
        c = slice(h * d, (h + 1) * d)
        weights = q[..., c] @ k[..., c].transpose(1, 2)  # (B, N, N): phi(q_i) . phi(k_j)
        out[..., c] = weights @ v[..., c] / (weights.sum(-1, keepdim=True) + 1e-6 * N)
    # the depthwise conv: one kernel shared by the heads, on each head's channels of the patch tokens' V
    kernel = attn.dwc.weight.double()
    pad = kernel.shape[-1] // 2
    v_map = v[:, num_prefix:].reshape(B, H, W, C).permute(0, 3, 1, 2)
    conv = torch.cat([F.conv2d(v_map[:, c0:c0 + d], kernel, attn.dwc.bias.double(), padding=pad, groups=d)
                      for c0 in range(0, C, d)], dim=1)
    out[:, num_prefix:] += conv.permute(0, 2, 3, 1).reshape(B, H * W, C)
    return out @ attn.proj.weight.double().t() + attn.proj.bias.double()


def randomised_attention(num_prefix: int = 1) -> FlattenDeitAttention:
    torch.manual_seed(0)
    attn = FlattenDeitAttention(16, num_heads=2, grid_size=(3, 4), num_prefix_tokens=num_prefix)
    with torch.no_grad():  # every parameter away from its initial value, the key encoding and scale included
        for p in attn.parameters():
            p.normal_(0, 0.3)
    return attn


@pytest.mark.parametrize('impl', ['torch', 'reference'])
@pytest.mark.parametrize('feat_size', [(3, 4), (5, 2)], ids=['training_grid', 'other_grid'])
@pytest.mark.parametrize('num_prefix', [1, 2])
def test_attention_matches_the_equations(impl, feat_size, num_prefix):
    """Outputs and gradients (input and every parameter) of the class-token attention equal the float64
    transcription: at its training grid and at a non-square grid of another size (key encoding resized there)."""
    attn = randomised_attention(num_prefix)
    attn.attn_impl = impl
    x = torch.randn(2, num_prefix + feat_size[0] * feat_size[1], 16, requires_grad=True)
    expected = transcribed_attention(attn, x, feat_size, num_prefix)
    out = attn(x, feat_size)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)

    grad = torch.randn_like(out)
    params = [x] + list(attn.parameters())
    got = torch.autograd.grad(out, params, grad)
    want = torch.autograd.grad(expected, params, grad.double())
    for (name, _), g, w in zip([('x', x)] + list(attn.named_parameters()), got, want):
        torch.testing.assert_close(g.double(), w.double(), atol=5e-5, rtol=1e-3,
                                   msg=lambda m: f'gradient of {name}: {m}')

    with torch.no_grad():  # the inference path (in-place, scratch buffers)
        torch.testing.assert_close(attn(x, feat_size).double(), expected, atol=2e-5, rtol=1e-4)


def test_class_token_gets_no_conv_and_no_key_encoding():
    """The prefix rows: changing the depthwise conv moves only patch outputs' conv terms, and the key encoding
    touches no prefix key (a transcription that gave the class token either would differ here)."""
    attn = randomised_attention()
    x = torch.randn(1, 1 + 12, 16)
    with torch.no_grad():
        before = attn(x, (3, 4))
        attn.dwc.weight.add_(1.0)
        after = attn(x, (3, 4))
    # the attention part is unchanged; the conv part differs on patch tokens only, so the class token's output
    # (before the output projection, which mixes channels but not tokens) is the same
    torch.testing.assert_close(before[:, 0], after[:, 0])
    assert (before[:, 1:] - after[:, 1:]).abs().min() > 0


# ---- the models --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name,dims', [('flatten_deit_tiny_patch16_224', (192, 12, 3)),
                                       ('flatten_deit_small_patch16_224', (384, 12, 6)),
                                       ('flatten_deit_base_patch16_224', (768, 12, 12))])
def test_registered_sizes_and_cfgs(name, dims):
    model = timm.create_model(name, device='meta')
    attn = model.blocks[0].attn
    assert (model.embed_dim, len(model.blocks), attn.num_heads) == dims
    assert (attn.focusing_factor, attn.dwc.kernel_size, attn.key_grid_size) == (3, (5, 5), (14, 14))
    assert attn.scale.requires_grad
    cfg = model.pretrained_cfg
    assert (cfg['crop_pct'], cfg['interpolation'], cfg['mean'], cfg['std']) == (
        0.875, 'bicubic', (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert not cfg.get('url') and not cfg.get('hf_hub_id')


def test_pretrained_says_there_are_no_weights():
    with pytest.raises(RuntimeError, match='No pretrained weights exist for flatten_deit_tiny_patch16_224'):
        timm.create_model('flatten_deit_tiny_patch16_224', pretrained=True, **TINY_DEIT)


def test_tiny_model_at_224():
    model = timm.create_model('flatten_deit_tiny_patch16_224').eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


@pytest.mark.parametrize('size', [(64, 64), (70, 113), (33, 16)])
def test_any_size(size):
    """Non-square sizes that are not multiples of 16: the grid is ceil(H / 16) x ceil(W / 16) and the model equals
    its reference path there (depthwise conv and key encoding on the actual grid)."""
    model = tiny_deit(num_classes=7).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        logits = model(x)
        tokens = model.forward_features(x)
        reference = set_attn_impl(model, 'reference')(x)
    grid = (-(-size[0] // 16), -(-size[1] // 16))
    assert logits.shape == (2, 7) and tokens.shape == (2, 1 + grid[0] * grid[1], 32)
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-4)


def test_bad_input_is_a_clear_error():
    model = tiny_deit()
    with pytest.raises(ValueError, match='batch of images'):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match='input channels'):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match='at least 16x16'):
        model(torch.randn(1, 3, 8, 64))


@pytest.mark.parametrize('kwargs,match', [(dict(attn_drop_rate=0.1), 'no attention matrix'),
                                          (dict(patch_drop_rate=0.5), 'patch grid'),
                                          (dict(qk_norm=True), 'qk_norm'),
                                          (dict(attn_layer='diff'), 'attn_layer cannot be set')])
def test_options_without_meaning_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_deit(**kwargs)


def test_blocks_build_no_softmax_attention(monkeypatch):
    """timm's block is given nn.Identity as its attention: no softmax weights are made and thrown away (they would
    stay in the allocator's memory and draw from the random generator)."""
    import timm.models.vision_transformer as vit

    def refuse(*args, **kwargs):
        raise AssertionError('a softmax attention was built')
    monkeypatch.setattr(vit.Attention, '__init__', refuse)
    model = tiny_deit()
    assert all(type(block.attn) is FlattenDeitAttention for block in model.blocks)


# ---- the timm API ------------------------------------------------------------------------------------------------

def test_features_only_and_intermediates():
    """NCHW maps at stride 16 of every block asked, at a non-square size, equal between features_only,
    forward_intermediates (maps and tokens) and the blocks' own outputs."""
    torch.manual_seed(0)
    model = tiny_deit(depth=3).eval()
    backbone = tiny_deit(depth=3, features_only=True, out_indices=(0, 2)).eval()
    backbone.model.load_state_dict(model.state_dict(), strict=False)  # all but the pruned head
    x = torch.randn(2, 3, 70, 113)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x, indices=(0, 2))
        tokens = model.forward_intermediates(x, indices=(0, 2), output_fmt='NLC', intermediates_only=True,
                                             return_prefix_tokens=True)
        features = backbone(x)
        expected_final = model.forward_features(x)
    assert backbone.feature_info.reduction() == [16, 16] and backbone.feature_info.channels() == [32, 32]
    assert [m.shape for m in maps] == [(2, 32, 5, 8)] * 2
    for m, f, (t, prefix) in zip(maps, features, tokens):
        torch.testing.assert_close(f, m)
        torch.testing.assert_close(m.flatten(2).transpose(1, 2), t)
        assert prefix.shape == (2, 1, 32)
    torch.testing.assert_close(final, expected_final)
    with pytest.raises(ValueError, match='output_fmt'):
        model.forward_intermediates(x, output_fmt='NHWC')


def test_set_input_size_and_fixed_size_models():
    model = tiny_deit(dynamic_img_size=False).eval()
    with pytest.raises(AssertionError, match="doesn't match"):
        model(torch.randn(1, 3, 96, 128))
    model.set_input_size((96, 128))
    assert model.pos_embed.shape == (1, 1 + 6 * 8, 32)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 128)).shape == (1, 1000)


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = tiny_deit()
    x = torch.randn(2, 3, 48, 80)
    model(x).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing()
    model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], msg=n)


def test_compile_fullgraph():
    """One graph, no breaks, equal to eager at a non-square size (aot_eager: the graph, not inductor's build)."""
    model = tiny_deit(depth=1).eval()
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


def test_fx_feature_extraction():
    from timm.models import create_feature_extractor
    model = tiny_deit().eval()
    extractor = create_feature_extractor(model, return_nodes=['blocks.1', 'head'])
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        out = extractor(x)
        torch.testing.assert_close(out['head'], model(x))
    assert out['blocks.1'].shape == (2, 1 + 3 * 5, 32)


@pytest.mark.parametrize('features_only', [False, True], ids=['classifier', 'features_only'])
def test_dynamic_onnx_at_three_sizes(tmp_path, features_only):
    """What `flatten-timm export --dynamic` writes: one graph, right at the export size and two non-square sizes
    that are not multiples of 16 (so the position embedding is resampled and the grid padded in the graph)."""
    pytest.importorskip('onnxruntime')
    from flatten_timm.export import check_onnx, export_onnx
    kwargs = dict(features_only=True, out_indices=(0, 1)) if features_only else {}
    model = tiny_deit(**kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        path = export_onnx(model, tmp_path / 'deit.onnx', (64, 64), dynamic=True)
    sizes = [(64, 64), (84, 104), (44, 60)]
    checks = check_onnx(path, model, sizes, batch_size=2)
    for check, (H, W) in zip(checks, sizes):
        assert check.max_abs_diff < 1e-4, check
        grid = (-(-H // 16), -(-W // 16))
        assert check.output_shapes == ([(2, 32, *grid)] * 2 if features_only else [(2, 1000)])


# ---- warm start from softmax weights ----------------------------------------------------------------------------

def test_warm_start_copies_every_shared_key_and_lists_the_added_ones():
    torch.manual_seed(0)
    softmax = timm.create_model('deit_tiny_patch16_224', **TINY_DEIT)
    model = tiny_deit()
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = warm_start_from_softmax(model, softmax)

    added = {f'blocks.{i}.attn.{name}' for i in range(2)
             for name in ('dwc.weight', 'dwc.bias', 'scale', 'positional_encoding')}
    assert set(report.added) == added
    assert set(report.copied) == set(softmax.state_dict()) and not report.resampled and not report.reinitialised
    state = model.state_dict()
    for k, v in softmax.state_dict().items():
        assert torch.equal(state[k], v), k
    for k in added:  # what focused linear attention adds keeps its fresh initialisation
        assert torch.equal(state[k], fresh[k]), k
    # the warm-started model computes with the copied weights (no stale folded projections)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), set_attn_impl(model, 'reference')(x), atol=1e-5, rtol=1e-4)


def test_warm_start_resamples_the_grid_and_reports_another_head():
    softmax = timm.create_model('vit_tiny_patch16_224', **{**TINY_DEIT, 'img_size': 32}, num_classes=10)
    model = tiny_deit()
    report = warm_start_from_softmax(model, {'model': softmax.state_dict()})
    assert report.resampled == ['pos_embed'] and model.pos_embed.shape == (1, 17, 32)
    assert sorted(report.reinitialised) == ['head.bias', 'head.weight']
    torch.testing.assert_close(model.pos_embed[:, 0], softmax.pos_embed[:, 0])  # the class token's row


@pytest.mark.parametrize('source,match', [
    ('deit_tiny_distilled_patch16_224', 'distilled'),
    ('vit_small_patch16_224', 'shape'),
])
def test_warm_start_refuses_other_models(source, match):
    kwargs = dict(TINY_DEIT, embed_dim=64) if 'small' in source else TINY_DEIT
    with pytest.raises(ValueError, match=match):
        warm_start_from_softmax(tiny_deit(), timm.create_model(source, **kwargs))


# ---- recipes -----------------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def _train_script():
    return load_script('scripts/train.py')


@pytest.mark.parametrize('config', sorted((REPO / 'configs' / 'deit').glob('*.yaml')), ids=lambda p: p.stem)
def test_every_deit_config_builds_its_model_and_optimizer(config):
    """DeiT's recipe (or the short warm-start fine-tune) builds: model on the meta device, AdamW at lr scaled by
    the global batch (8 x batch_size = paper_global_batch) / 512, weight decay 0.05, drop path 0.1."""
    train = _train_script()
    args = train.parse_args(['--config', str(config), '--data-dir', '/nonexistent'])
    assert config.stem in (args.model, f'{args.model}_warm_start')
    assert args.config_metadata['paper_global_batch'] == args.batch_size * 8 == 1024
    assert (args.opt, args.weight_decay, args.drop_path, args.smoothing, args.mixup, args.cutmix, args.reprob) == (
        'adamw', 0.05, 0.1, 0.1, 0.8, 1.0, 0.25)
    assert args.epochs == (30 if config.stem.endswith('_warm_start') else 300)
    with torch.device('meta'):
        model = train.build_model(args, num_classes=1000)
    optimizer, scheduler, num_epochs = train.build_optimizer_and_scheduler(args, model, world_size=8,
                                                                          updates_per_epoch=10)
    assert num_epochs == args.epochs + args.cooldown_epochs
    assert optimizer.param_groups[0]['initial_lr'] == pytest.approx(args.lr * 1024 / 512)


def test_initial_checkpoint_loads_through_load_pretrained(tmp_path):
    """What train.py --initial-checkpoint does: this project's file, trained at another size, fitted to the grid."""
    from safetensors.torch import save_file
    trained = tiny_deit(img_size=48)
    save_file(trained.state_dict(), str(tmp_path / 'w.safetensors'))
    model = tiny_deit()
    model.load_pretrained(str(tmp_path / 'w.safetensors'))
    torch.testing.assert_close(model.blocks[1].attn.qkv.weight, trained.blocks[1].attn.qkv.weight)
    assert model.pos_embed.shape == (1, 17, 32) and model.blocks[0].attn.positional_encoding.shape == (1, 16, 32)


def test_checkpoint_of_the_commands(tmp_path):
    """The flatten-timm commands' --checkpoint path: the model takes the file's class count and weights."""
    from safetensors.torch import save_file
    from flatten_timm.checkpoint import CheckpointError, create_model_from_checkpoint
    trained = tiny_deit(num_classes=3).eval()
    save_file(trained.state_dict(), str(tmp_path / 'w.safetensors'))
    model = create_model_from_checkpoint('flatten_deit_tiny_patch16_224', str(tmp_path / 'w.safetensors'),
                                         **TINY_DEIT).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained(x))
    save_file(tiny_deit(depth=1).state_dict(), str(tmp_path / 'other.safetensors'))
    with pytest.raises(CheckpointError, match='missing keys'):
        create_model_from_checkpoint('flatten_deit_tiny_patch16_224', str(tmp_path / 'other.safetensors'),
                                     **TINY_DEIT)


# ---- training ----------------------------------------------------------------------------------------------------

def test_digits_training_learns():
    """A tiny FLatten-DeiT trained 5 epochs on scikit-learn's digits (16x16, 4x4 patches) is far above chance on
    the held-out quarter (55-72% over seeds 0-2): the class token reads the patches through focused linear
    attention."""
    pytest.importorskip('sklearn')
    experiment = load_script('scripts/deit_warm_start.py')
    x, y, x_test, y_test = experiment.digits(16)
    model = experiment.flatten_deit(0, embed_dim=32, depth=2, num_heads=2)
    assert experiment.accuracy(model, x_test, y_test) < 0.2
    experiment.train(model, x, y, epochs=5, seed=0, lr=3e-3)
    assert experiment.accuracy(model, x_test, y_test) > 0.5  # chance is 0.1
