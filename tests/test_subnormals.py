""" Training focused linear attention computes with normal float32 numbers only: subnormal ones (below 1.2e-38)
run many times slower on many CPUs.

A channel at the kernel's floor maps to ~(1e-6 / s)**3 ~ 1e-18, and where a channel is at the floor in every
key, the keys' gradients in it are as small; the backward multiplies such values together (~1e-40). It keeps
them normal by carrying its gradients scaled (torch_training.GRADIENT_SCALE). Counted here, with flushing off:
subnormal values in every op's output and in the products that batched matmuls add up.
"""
import collections
import os

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from flatten_timm.layers import FocusedLinearAttention

# buffers that hold whatever memory they were given until written
UNINITIALISED = {'empty', 'empty_like', 'new_empty', 'new_empty_strided', 'empty_strided'}
BATCHED_MATMULS = {'bmm': (0, 1), 'baddbmm': (1, 2)}

pytestmark = pytest.mark.skipif(bool(os.environ.get('FLATTEN_ATTN_IMPL')),
                                reason='FLATTEN_ATTN_IMPL overrides the implementation these tests train')


def count_subnormals(x) -> int:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return 0
    magnitude = x.detach().abs()
    return int(((magnitude > 0) & (magnitude < torch.finfo(x.dtype).tiny)).sum())


class SubnormalCounter(TorchDispatchMode):
    """Subnormal values per op: in its outputs (views and uninitialised buffers aside) and, for a batched matmul,
    in the products of its operands' pairs (what its multiply-adds compute)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not func.is_view and name not in UNINITIALISED:
            self.counts[name] += sum(count_subnormals(t) for t in tree_flatten(out)[0])
        if name in BATCHED_MATMULS:
            a, b = (args[i] for i in BATCHED_MATMULS[name])
            self.counts[f'{name} products'] += count_subnormals(a.unsqueeze(-1) * b.unsqueeze(-3))
        return out

    def found(self) -> dict:
        return {name: n for name, n in self.counts.items() if n}


@pytest.fixture
def no_flushing():
    """Subnormal numbers kept (flushing them would hide them), for the test only: the setting is per process."""
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(False)


@pytest.mark.parametrize('num_heads', [1, 2])
def test_attention_with_channels_at_the_floor_trains_without_subnormals(no_flushing, num_heads):
    """Channels of q and k at the floor in every token, as ReLU leaves many in training, and gradients of the
    size a classifier's loss gives (1e-4)."""
    torch.manual_seed(0)
    attn = FocusedLinearAttention(32, num_heads=num_heads, grid_size=(4, 4), attn_impl='torch')
    with torch.no_grad():  # q and k below zero in their first 12 channels, whatever the tokens
        for part in (0, 1):
            rows = slice(part * 32, part * 32 + 12)
            attn.qkv.weight[rows] = 0
            attn.qkv.bias[rows] = -1
    x = torch.randn(4, 16, 32, requires_grad=True)
    out = attn(x, (4, 4))
    counter = SubnormalCounter()
    with counter:
        grads = torch.autograd.grad(out, [x, *attn.parameters()], 1e-4 * torch.randn_like(out))
    assert not counter.found(), counter.found()
    assert not any(count_subnormals(g) for g in grads)


def test_tiny_flatten_deit_training_steps_compute_without_subnormals(no_flushing):
    """Steps of the digits experiment's FLatten-DeiT (scripts/deit_warm_start.py) with AdamW, forward, backward and
    update: nothing in them is subnormal, so flushing subnormals changes nothing."""
    torch.manual_seed(0)
    model = timm.create_model('flatten_deit_tiny_patch16_224', img_size=16, patch_size=4, in_chans=1,
                              num_classes=10, embed_dim=32, depth=2, num_heads=2, attn_impl='torch')
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    x, y = torch.randn(16, 1, 16, 16), torch.randint(0, 10, (16,))
    counter = SubnormalCounter()
    for _ in range(3):
        with counter:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert not counter.found(), counter.found()
