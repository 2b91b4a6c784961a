""" Focused linear attention (FLatten Transformer, Han et al., ICCV 2023), the one implementation every
flatten_* family uses.

- spec.py: the paper's equations in their order of operations ('reference', and what the tests compare with);
- torch_inference.py: torch ops without autograd, in few passes over memory;
- torch_training.py: the autograd function whose backward recomputes the focused maps instead of keeping them;
- triton_kernels.py: the same forward and backward as fused Triton kernels;
- dispatch.py: the one place that decides which of them runs, and how;
- modules.py: FocusedLinearAttention and FocusedLinearAttention2d, the paper's steps around the attention.
"""
from .dispatch import (
    ATTN_IMPL_ENV, ATTN_IMPLS, SELECTOR, ImplSelector, focused_linear_attention, resolve_attn_impl,
    run_focused_linear_attention, selection_key, set_attn_impl, triton_available)
from .modules import FocusedLinearAttention, FocusedLinearAttention2d
from .spec import focusing_map, linear_attention
