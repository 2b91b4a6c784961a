""" fp16 training without overflow: the fast attention paths keep their gradients in range wherever the
reference does, at GradScaler's loss scales, at every head dim; and they match float64.

A GradScaler multiplies the loss by its scale (2^16 at the start); the backward is linear in that factor, so
gradients finite at 2^16 are finite at every smaller scale.
"""
import copy
import warnings

import pytest
import torch

from flatten_timm.layers import FocusedLinearAttention
from flatten_timm.layers.attn_impl import triton_available

GRAD_SCALER_INIT_SCALE = 2. ** 16
IMG = 64

# (head dim, heads, map side): head dims 4-64, 1-8 heads, maps 8-80
RANGE_CASES = [(4, 8, 24), (4, 2, 80), (4, 1, 8), (8, 2, 20), (8, 8, 16), (16, 4, 32), (32, 2, 12), (64, 1, 40)]
# Triton's CPU interpreter is slow: small maps
TRITON_RANGE_CASES = [(4, 4, 8), (8, 2, 12), (16, 1, 10), (64, 2, 8)]


def _attention(head_dim: int, heads: int, side: int, seed: int = 0):
    torch.manual_seed(seed)
    dim = head_dim * heads
    attn = FocusedLinearAttention(dim, num_heads=heads, grid_size=(side, side))
    with torch.no_grad():  # nothing at its init value: a kernel scale of either side of 1, a key encoding
        attn.scale.normal_(0, 0.5)
        attn.positional_encoding.normal_(0, 0.3)
    return attn, torch.randn(2, side * side, dim)


def _fp16_gradients(attn, x, side: int, loss_scale: float):
    """Gradients of x and of every parameter, unscaled, from an fp16 autocast step at `loss_scale`."""
    attn.zero_grad()
    x = x.clone().requires_grad_()
    with torch.autocast('cpu', dtype=torch.float16):
        out = attn(x, (side, side))
    (out.float().mean() * loss_scale).backward()
    return out.detach(), [x.grad / loss_scale] + [p.grad / loss_scale for p in attn.parameters()]


def _float64_reference(attn, x, side: int):
    attn = copy.deepcopy(attn).double()
    attn.attn_impl = 'reference'
    x = x.double().requires_grad_()
    out = attn(x, (side, side))
    out.mean().backward()
    return out.detach(), [x.grad] + [p.grad for p in attn.parameters()]


def _relative_error(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _check_range_and_accuracy(impl: str, head_dim: int, heads: int, side: int):
    attn, x = _attention(head_dim, heads, side)
    attn.attn_impl = 'reference'
    _, reference_grads = _fp16_gradients(attn, x, side, GRAD_SCALER_INIT_SCALE)
    assert all(torch.isfinite(g).all() for g in reference_grads), 'the reference overflows here: a wrong case'
    attn.attn_impl = impl
    out, grads = _fp16_gradients(attn, x, side, GRAD_SCALER_INIT_SCALE)
    names = ['x'] + [name for name, _ in attn.named_parameters()]
    for name, g in zip(names, grads):
        assert torch.isfinite(g).all(), f'{impl}: gradient of {name} overflows at loss scale 2^16'
    if head_dim * heads < 16:
        # with few channels, a query whose every channel is near zero is common, and there the attention is
        # steep (its normaliser is the 1e-6): whether fp16 rounds such a query to either side of zero decides
        # its gradient, for the reference as for the fast paths. Range only.
        return
    ref_out, ref_grads = _float64_reference(attn, x, side)
    # measured: outputs 5e-4 to 7e-4, gradients 1e-3 to 5e-3 (as the reference path's): ~3x margin
    assert _relative_error(out, ref_out) < 2e-3
    for name, g, r in zip(names, grads, ref_grads):
        assert _relative_error(g, r) < 1.5e-2, f'{impl}: gradient of {name}'


@pytest.mark.parametrize('head_dim,heads,side', RANGE_CASES)
def test_torch_path_fp16_gradients_stay_in_range_and_match_float64(head_dim, heads, side):
    _check_range_and_accuracy('torch', head_dim, heads, side)


@pytest.mark.skipif(not triton_available(torch.device('cpu')), reason='Triton is not installed')
@pytest.mark.parametrize('head_dim,heads,side', TRITON_RANGE_CASES)
def test_triton_fp16_gradients_stay_in_range_and_match_float64(head_dim, heads, side):
    with warnings.catch_warnings():
        warnings.simplefilter('error', RuntimeWarning)  # a kernel that fell back to torch ops fails
        _check_range_and_accuracy('triton', head_dim, heads, side)


def _tiny_yolo(attention: bool) -> dict:
    """A small YOLO whose attention rows get head dim 8 (64 channels, 8 heads), or the same YAML with
    identities in their place."""
    attn = ['FocusedLinearAttention2d', [8]] if attention else ['nn.Identity', []]
    return {
        'nc': 2, 'depth_multiple': 1.0, 'width_multiple': 1.0,
        'backbone': [
            [-1, 1, 'Conv', [8, 3, 2]],  # 0 P1/2
            [-1, 1, 'Conv', [16, 3, 2]],  # 1 P2/4
            [-1, 1, 'Conv', [64, 3, 2]],  # 2 P3/8
            [-1, 1, *attn],  # 3
            [-1, 1, 'Conv', [64, 3, 2]],  # 4 P4/16
            [-1, 1, *attn],  # 5
        ],
        'head': [[[3, 5], 1, 'Detect', ['nc']]],
    }


def _final_grad_scale(attention: bool, steps: int = 30) -> float:
    """GradScaler's scale after `steps` fp16 autocast training steps of `_tiny_yolo` on random boxes."""
    from types import SimpleNamespace

    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel(_tiny_yolo(attention), ch=3, nc=2, verbose=False)
    model.args = SimpleNamespace(box=7.5, cls=0.5, dfl=1.5)  # Ultralytics' default loss gains
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler('cpu')
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        boxes = 4
        batch = {
            'img': torch.rand(2, 3, IMG, IMG, generator=g),
            'batch_idx': torch.arange(2).repeat_interleave(boxes // 2).float(),
            'cls': torch.randint(0, 2, (boxes, 1), generator=g).float(),
            'bboxes': torch.cat([0.3 + 0.4 * torch.rand(boxes, 2, generator=g),
                                 0.1 + 0.2 * torch.rand(boxes, 2, generator=g)], dim=1),
        }
        with torch.autocast('cpu', dtype=torch.float16):
            preds = model(batch['img'])
        loss, _ = model.loss(batch, preds)
        optimizer.zero_grad()
        scaler.scale(loss.sum()).backward()
        scaler.step(optimizer)
        scaler.update()
    return scaler.get_scale()


def test_yolo_with_head_dim_8_attention_trains_in_fp16_at_the_scale_of_its_attention_free_twin():
    pytest.importorskip('ultralytics')
    from flatten_timm.integrations import ultralytics as flatten_ultralytics
    flatten_ultralytics.register()
    with_attention, without = _final_grad_scale(True), _final_grad_scale(False)
    assert without >= 2 ** 10, 'the attention-free twin itself backs off: a wrong test setup'
    assert with_attention >= without / 4, (with_attention, without)
