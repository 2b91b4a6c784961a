""" Focused linear attention: the names this module has always offered, from their home in `fla/`. """
from .fla import (  # noqa: F401
    FocusedLinearAttention, FocusedLinearAttention2d, focused_linear_attention, focusing_map, linear_attention,
    run_focused_linear_attention)

__all__ = ['FocusedLinearAttention', 'FocusedLinearAttention2d', 'focused_linear_attention', 'focusing_map',
           'linear_attention', 'run_focused_linear_attention']
