""" Which implementation of focused linear attention runs: the names this module has always offered, from their
home in `fla/dispatch.py`. """
from .fla.dispatch import (  # noqa: F401
    ATTN_IMPL_ENV, ATTN_IMPLS, SELECTOR, ImplSelector, resolve_attn_impl, selection_key, set_attn_impl,
    triton_available)

__all__ = ['ATTN_IMPLS', 'ATTN_IMPL_ENV', 'SELECTOR', 'ImplSelector', 'resolve_attn_impl', 'selection_key',
           'set_attn_impl', 'triton_available']
