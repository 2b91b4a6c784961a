""" Which implementation of focused linear attention runs: torch ops or the fused Triton kernels.

`attn_impl` of a FocusedLinearAttention (or the FLATTEN_ATTN_IMPL environment variable, which wins for a
whole run) is one of
- 'auto' (default): on CUDA, time the candidates once per (shapes, strides, dtype, device, grad mode)
  on first use and keep the faster, as torch.backends.cudnn.benchmark does; torch ops elsewhere and
  under torch.compile (inductor fuses them itself), so 'auto' can never make a model slower;
- 'torch': the torch ops of `focused_linear_attention`;
- 'triton': the fused kernels (CUDA, or the CPU under TRITON_INTERPRET=1);
- 'reference': the spec's order of operations, step by step (for tests and comparisons).
A Triton path that fails to compile or launch falls back to torch with one warning.
"""
import os
import time
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch

__all__ = ['ATTN_IMPLS', 'ATTN_IMPL_ENV', 'SELECTOR', 'ImplSelector', 'resolve_attn_impl', 'selection_key',
           'set_attn_impl', 'triton_available']

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
