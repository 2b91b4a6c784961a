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


def cuda_event_timer(fn: Callable[[], object], warmup: int = 2, repeats: int = 5) -> float:
    """Median seconds of fn() on the current device, synchronised."""
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
    """ Picks the faster of several implementations per key, timing each once, and remembers it.

    An implementation that raises is dropped (one warning per implementation) and the others are kept.
    """

    def __init__(self, timer: Callable[[Callable[[], object]], float] = cuda_event_timer):
        self.timer = timer
        self.choices: Dict[Tuple, str] = {}
        self.broken: Dict[str, str] = {}

    def run(self, key: Tuple, candidates: Dict[str, Callable[[], torch.Tensor]],
            fallback: str = 'torch') -> torch.Tensor:
        """The result of the chosen candidate for `key`; times them all on the key's first call."""
        choice = self.choices.get(key)
        if choice is not None:
            return self.call(choice, candidates, fallback)
        timings = {}
        for name, fn in candidates.items():
            if name in self.broken:
                continue
            try:
                with torch.no_grad():
                    timings[name] = self.timer(fn)
            except Exception as e:  # a kernel that does not compile here: never again, say so once
                self._mark_broken(name, e)
        self.choices[key] = min(timings, key=timings.get) if timings else fallback
        return self.call(self.choices[key], candidates, fallback)

    def call(self, name: str, candidates: Dict[str, Callable[[], torch.Tensor]], fallback: str = 'torch'
             ) -> torch.Tensor:
        """The result of candidate `name`, or of `fallback` (with one warning) if it fails."""
        if name != fallback and name not in self.broken:
            try:
                return candidates[name]()
            except Exception as e:
                self._mark_broken(name, e)
        return candidates[fallback]()

    def _mark_broken(self, name: str, error: Exception):
        if name not in self.broken:
            self.broken[name] = f'{type(error).__name__}: {error}'
            warnings.warn(f'focused linear attention: the {name!r} implementation failed ({self.broken[name]}); '
                          f'using torch ops instead', RuntimeWarning, stacklevel=4)
        self.choices = {k: v for k, v in self.choices.items() if v != name}


# one selector for the process, as cudnn.benchmark keeps one cache
SELECTOR = ImplSelector()


def selection_key(*tensors: Optional[torch.Tensor], extra: Tuple = ()) -> Tuple:
    parts = [(tuple(t.shape), t.stride(), t.dtype, t.device) if t is not None else None for t in tensors]
    return (*parts, torch.is_grad_enabled(), *extra)
