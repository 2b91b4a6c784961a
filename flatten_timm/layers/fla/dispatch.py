""" The one place that decides which implementation of focused linear attention runs, and how.

`attn_impl` of a FocusedLinearAttention (or the FLATTEN_ATTN_IMPL environment variable, which wins for a
whole run) is one of
- 'auto' (default): on CUDA, time the candidates once per (shapes, strides, dtype, device, grad mode)
  on first use and keep the faster, as torch.backends.cudnn.benchmark does; torch ops elsewhere and
  under torch.compile (inductor fuses them itself), so 'auto' can never make a model slower;
- 'torch': the torch ops of `focused_linear_attention` (torch_inference.py without autograd, torch_training.py
  with it);
- 'triton': the fused kernels (CUDA, or the CPU under TRITON_INTERPRET=1; triton_kernels.py);
- 'reference': the spec's order of operations, step by step (spec.py; for tests and comparisons).
A Triton path that fails to compile or launch falls back to torch with one warning. Within the torch ops, the
layout of the heads and whether queries and keys share their passes depend on device, dtype, size and on
whether the graph is traced (exported or compiled): `torch_layout`.
"""
import os
import time
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch

from ..symbolic_shapes import is_exporting
from .torch_inference import attend_without_autograd
from .torch_training import TorchAttentionFn

__all__ = ['ATTN_IMPLS', 'ATTN_IMPL_ENV', 'SELECTOR', 'ImplSelector', 'focused_linear_attention', 'resolve_attn_impl',
           'run_focused_linear_attention', 'selection_key', 'set_attn_impl', 'torch_layout', 'triton_available']

ATTN_IMPLS = ('auto', 'torch', 'triton', 'reference')
ATTN_IMPL_ENV = 'FLATTEN_ATTN_IMPL'
ENV_OVERRIDE = os.environ.get(ATTN_IMPL_ENV, '')  # for the whole run


def resolve_attn_impl(attn_impl: str, env_override: Optional[str] = None) -> str:
    """The implementation in force: FLATTEN_ATTN_IMPL (read once, at import) if set, else the module's own."""
    env_override = ENV_OVERRIDE if env_override is None else env_override
    impl = env_override or attn_impl
    if impl not in ATTN_IMPLS:
        source = f'{ATTN_IMPL_ENV}={impl!r}' if env_override else f'attn_impl={impl!r}'
        raise ValueError(f'{source} is not an attention implementation; choose one of {", ".join(ATTN_IMPLS)}')
    return impl


def set_attn_impl(model: torch.nn.Module, attn_impl: str) -> torch.nn.Module:
    """Set the implementation of every focused linear attention layer in `model` (returns the model)."""
    resolve_attn_impl(attn_impl, env_override='')
    for module in model.modules():
        if hasattr(module, 'attn_impl'):
            module.attn_impl = attn_impl
    return model


def triton_available(device: torch.device) -> bool:
    """Triton importable, and a device it runs on: CUDA, or the CPU under TRITON_INTERPRET=1."""
    if device.type != 'cuda' and os.environ.get('TRITON_INTERPRET') != '1':
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def cuda_event_timer(name: str, fn: Callable[[], object], warmup: int = 2, repeats: int = 5) -> float:
    """Median seconds of fn() on the current device, synchronised (`name` is for other timers' use)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


class ImplSelector:
    """ Picks the faster of several implementations of one function per key, timing each once.

    Candidates are functions of the same arguments. With autograd recording, a candidate is timed on
    forward and backward (on detached copies of the inputs: nothing reaches the caller's graph);
    otherwise on forward alone. An implementation that raises is dropped with one warning.
    """

    def __init__(self, timer: Callable[[str, Callable[[], object]], float] = cuda_event_timer):
        self.timer = timer
        self.choices: Dict[Tuple, str] = {}
        self.broken: Dict[str, str] = {}

    def run(self, key: Tuple, candidates: Dict[str, Callable[..., torch.Tensor]], args: Tuple,
            fallback: str = 'torch') -> torch.Tensor:
        """candidates[choice](*args) for the choice of `key`; times them all on the key's first call."""
        choice = self.choices.get(key)
        if choice is None:
            timings = {}
            for name, fn in candidates.items():
                if name in self.broken:
                    continue
                try:
                    timings[name] = self.timer(name, self._timed_call(fn, args))
                except Exception as e:  # a kernel that does not compile here: never again, say so once
                    self._mark_broken(name, e)
            choice = self.choices[key] = min(timings, key=timings.get) if timings else fallback
        return self.call(choice, candidates, args, fallback)

    @staticmethod
    def _timed_call(fn: Callable[..., torch.Tensor], args: Tuple) -> Callable[[], object]:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
            def forward():
                with torch.no_grad():
                    return fn(*args)
            return forward
        leaves = [a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]
        grad = []

        def forward_backward():
            out = fn(*leaves)
            if not grad:
                grad.append(torch.randn_like(out))
            out.backward(grad[0])
        return forward_backward

    def call(self, name: str, candidates: Dict[str, Callable[..., torch.Tensor]], args: Tuple,
             fallback: str = 'torch') -> torch.Tensor:
        """candidates[name](*args), or the fallback's (with one warning) if it fails."""
        if name != fallback and name not in self.broken:
            try:
                return candidates[name](*args)
            except Exception as e:
                self._mark_broken(name, e)
        return candidates[fallback](*args)

    def _mark_broken(self, name: str, error: Exception):
        if name not in self.broken:
            self.broken[name] = f'{type(error).__name__}: {error}'
            warnings.warn(f'focused linear attention: the {name!r} implementation failed ({self.broken[name]}); '
                          f'using torch ops instead', RuntimeWarning, stacklevel=4)
        self.choices = {k: v for k, v in self.choices.items() if v != name}


# one selector for the process, as cudnn.benchmark keeps one cache
SELECTOR = ImplSelector()


def selection_key(args: Tuple) -> Tuple:
    """What a choice depends on: shapes, strides, dtypes and devices of the tensors, the other arguments, and
    whether a backward will follow."""
    parts = [(tuple(a.shape), a.stride(), a.dtype, a.device, a.requires_grad) if isinstance(a, torch.Tensor) else a
             for a in args]
    return (*parts, torch.is_grad_enabled())


_BATCHED_HEADS_MAX_TOKENS = 4096  # batch x tokens up to which all heads go through one matmul


def _block_diagonal_pays(q: torch.Tensor, num_heads: int) -> bool:
    """Heads as block-diagonal matmuls: on a GPU in half precision, where the tensor cores make the extra
    products of other heads' channels free and the launches of a loop over heads are what costs."""
    return num_heads > 1 and q.device.type == 'cuda' and q.dtype in (torch.float16, torch.bfloat16)


def _stacking_pays(q: torch.Tensor) -> bool:
    """Queries and keys of one size in separate buffers stacked, so that the focusing passes (of a training
    forward, and of the backward) run once over both: on a GPU, where each pass is a launch; on a CPU the copies
    into the stack cost more than the launches they save (a backward 1.4x slower)."""
    return q.device.type == 'cuda'


def torch_layout(q: torch.Tensor, num_heads: int, exporting: bool) -> Tuple[str, bool, bool]:
    """How the torch ops run on these queries: (the heads' layout, join q and k when they are the halves of one
    projection, stack q and k of one size). An exported graph takes one batched matmul over the heads at every
    size (batch and tokens are symbols there) and reads no storage."""
    B, N = q.shape[:2]
    if not exporting and _block_diagonal_pays(q, num_heads):
        heads = 'block_diagonal'
    elif exporting or (num_heads > 1 and B * N <= _BATCHED_HEADS_MAX_TOKENS):
        heads = 'one_matmul'  # few tokens: one matmul over all heads beats a Python loop of small ops
    else:
        heads = 'loop'
    traced = exporting or torch.compiler.is_compiling()
    return heads, not traced, _stacking_pays(q) and not exporting


def focused_linear_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        floor: torch.Tensor,
        focusing_factor: float,
        num_heads: int,
        residual: Optional[torch.Tensor] = None,
        key_offset: Optional[torch.Tensor] = None,
        overwrite_inputs: bool = False,
) -> torch.Tensor:
    """Focused linear attention by torch ops on (B, N, C) tokens of any strides: (B, N, C) in v's dtype.

    q: (B, N, C) and k: (B, n, C) enter already shifted and divided by the kernel's scale, q = (q_proj + 1e-6) / s,
    and floor = 1e-6 / s of shape (C,) (the module folds 1 / s and the shift into its projection, or applies them by
    one pass); v: (B, n, C). residual (B, N, C) is added to the output (the depthwise conv of V). key_offset,
    broadcastable to k (the key positional encoding), is added to k first. Equal to
    `linear_attention(focusing_map(.), focusing_map(.), v)` of the spec.
    overwrite_inputs: without autograd (and outside traced graphs), q, k and residual may be used as scratch
    space (the module passes its own projections): no new buffers, which on a CPU also spares their first-touch
    page faults.
    """
    exporting = is_exporting()
    heads, join_qk, stack_qk = torch_layout(q, num_heads, exporting)
    if torch.is_grad_enabled() and not exporting and any(
            t is not None and t.requires_grad for t in (q, k, v, floor, residual, key_offset)):
        return TorchAttentionFn.apply(q, k, v, floor, focusing_factor, num_heads, residual, key_offset, heads, join_qk,
                                      stack_qk)
    # without autograd, powers and scalings overwrite their input (not in a traced graph, whose runtime plans its
    # own buffers)
    in_place = not torch.is_grad_enabled() and not exporting
    overwrite_inputs = overwrite_inputs and in_place and not torch.compiler.is_compiling()
    return attend_without_autograd(q, k, v, floor, focusing_factor, num_heads, residual, key_offset, heads, join_qk,
                                   stack_qk, in_place, overwrite_inputs)


def _fused_kernels(*args) -> torch.Tensor:
    if not triton_available(args[0].device):
        raise RuntimeError(f'Triton is not installed or does not run on {args[0].device.type} '
                           f'(on a CPU it needs TRITON_INTERPRET=1)')
    from .triton_kernels import triton_focused_linear_attention
    return triton_focused_linear_attention(*args)


_IMPLEMENTATIONS = {'torch': focused_linear_attention, 'triton': _fused_kernels}


def run_focused_linear_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        floor: torch.Tensor,
        focusing_factor: float,
        num_heads: int,
        residual: Optional[torch.Tensor] = None,
        key_offset: Optional[torch.Tensor] = None,
        attn_impl: str = 'auto',
        overwrite_inputs: bool = False,
) -> torch.Tensor:
    """`focused_linear_attention` by the implementation `attn_impl` selects ('auto', 'torch' or 'triton'):
    torch ops off CUDA, when exporting or compiling (inductor fuses them itself) and without Triton."""
    args = (q, k, v, floor, focusing_factor, num_heads, residual, key_offset)
    if attn_impl == 'torch' or is_exporting() or (attn_impl == 'auto' and (
            q.device.type != 'cuda' or torch.compiler.is_compiling() or not triton_available(q.device))):
        return focused_linear_attention(*args, overwrite_inputs=overwrite_inputs)
    if attn_impl == 'triton':
        return SELECTOR.call('triton', _IMPLEMENTATIONS, args)
    return SELECTOR.run(selection_key(args), _IMPLEMENTATIONS, args)
