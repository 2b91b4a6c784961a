""" Ops and bytes of one forward on the GPU code path, counted on any machine: a proxy for launches and memory traffic.

Runs each model once on the CPU under bf16 autocast without autograd, with the CPU-only fused kernels off and
softmax windows through SDPA (the ops a GPU runs with attn_impl='torch'), and counts every aten op that is not a
view, with the bytes of its tensor inputs and outputs. A bf16 forward of these models on a GPU is bound by
launches and memory traffic, so fewer ops and bytes there mean a faster GPU forward; the counts need no GPU.
With --training, also the bytes a bf16 training forward keeps for backward, per image (what grows with the
batch: the activations that set a training step's peak memory).

    python scripts/bench/count_ops.py flatten_pvt_v2_b0 pvt_v2_b0 [--img-size 224] [-b 8] [--top 12] [--training]
"""
import argparse
import collections
import contextlib
import importlib

import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import flatten_timm  # noqa: F401  (registers the models)
from flatten_timm.layers import set_cpu_fusion

# ops that launch no kernel: views of existing memory and allocations
NO_KERNEL = {'view', '_unsafe_view', 'reshape', '_reshape_alias', 'permute', 'transpose', 't', 'expand', 'slice',
             'select', 'split', 'split_with_sizes', 'chunk', 'unsqueeze', 'squeeze', 'as_strided', 'alias',
             'unbind', 'detach', 'lift_fresh', 'narrow', 'diagonal', 'promote_types', 'empty', 'empty_like',
             'empty_strided', 'new_empty', 'new_empty_strided'}


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()
        self.bytes = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in NO_KERNEL:
            self.calls[name] += 1
            self.bytes[name] += sum(t.numel() * t.element_size() for t in tree_flatten((args, kwargs, out))[0]
                                    if isinstance(t, torch.Tensor) and t.numel() > 1)
        return out


@contextlib.contextmanager
def gpu_code_path():
    """The choices a GPU makes: no CPU-only fusion, softmax windows through SDPA at every size, the heads of
    a half-precision focused linear attention as block-diagonal matmuls, and its backward's queries and keys
    stacked."""
    softmax = importlib.import_module('flatten_timm.layers.softmax_attention')
    linear = importlib.import_module('flatten_timm.layers.fla.dispatch')
    fused = set_cpu_fusion(False)
    explicit_max, block_diagonal, stacking = (
        softmax._CPU_EXPLICIT_MAX_KEYS, linear._block_diagonal_pays, linear._stacking_pays)
    softmax._CPU_EXPLICIT_MAX_KEYS = 0
    linear._block_diagonal_pays = lambda q, num_heads: num_heads > 1 and q.dtype in (torch.float16, torch.bfloat16)
    linear._stacking_pays = lambda q: True
    try:
        yield
    finally:
        set_cpu_fusion(fused)
        softmax._CPU_EXPLICIT_MAX_KEYS, linear._block_diagonal_pays, linear._stacking_pays = (
            explicit_max, block_diagonal, stacking)


def count(name: str, img_size: int = 224, batch_size: int = 8) -> OpCounter:
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = torch.randn(batch_size, 3, img_size, img_size)
    with gpu_code_path(), torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        model(x)  # caches filled, as in every call after the first
        with OpCounter() as counter:
            model(x)
    return counter


def kept_for_backward_per_image(name: str, img_size: int = 224) -> float:
    """Bytes a bf16 training forward keeps for backward, per image: the difference between batches of 4 and 2
    (parameters and their casts, kept once per step, cancel out), each tensor storage counted once."""
    def kept(batch_size):
        torch.manual_seed(0)
        model = timm.create_model(name).train()
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        x = torch.randn(batch_size, 3, img_size, img_size)
        with gpu_code_path(), torch.autocast('cpu', dtype=torch.bfloat16), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        return sum(storages.values())
    return (kept(4) - kept(2)) / 2


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('models', nargs='+')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('-b', '--batch-size', type=int, default=8)
    parser.add_argument('--top', type=int, default=0, help='also list the ops that move the most bytes')
    parser.add_argument('--training', action='store_true', help='also the MiB kept for backward per image')
    args = parser.parse_args()
    print(f'one bf16 forward, {args.img_size} px, batch {args.batch_size}, ops of the GPU code path\n')
    training = ' kept for backward, MiB per image |' if args.training else ''
    print(f'| model | ops | MB read + written |{training}\n|---|---|---|' + ('---|' if args.training else ''))
    counters = {name: count(name, args.img_size, args.batch_size) for name in args.models}
    for name, c in counters.items():
        kept = f' {kept_for_backward_per_image(name, args.img_size) / 2**20:.1f} |' if args.training else ''
        print(f'| {name} | {sum(c.calls.values())} | {sum(c.bytes.values()) / 1e6:.0f} |{kept}')
    for name, c in counters.items() if args.top else ():
        top = c.bytes.most_common(args.top)
        print(f'\n{name}: ' + ', '.join(f'{op} {c.calls[op]}x {b / 1e6:.0f} MB' for op, b in top))


if __name__ == '__main__':
    main()
