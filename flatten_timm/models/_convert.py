""" Helpers for converting official FLatten checkpoints to this project's layout.

Each family's `checkpoint_filter_fn` renames keys; these helpers do the parts the families share:
unwrap the training-checkpoint dict, fuse q/kv projections, drop rebuilt buffers, and resize
grid-shaped parameters to the target model's resolution.
"""
import logging
import math
import re
from typing import Dict, Iterable, Mapping, Tuple

import torch
import torch.nn as nn
from timm.layers import resize_rel_pos_bias_table

from flatten_timm.layers import resample_grid_tokens

_logger = logging.getLogger(__name__)

__all__ = ['unwrap_state_dict', 'rename_keys', 'fuse_qkv', 'fit_state_dict_to_model']

# buffers that official checkpoints carry but that are rebuilt from the architecture
REBUILT_BUFFERS = ('relative_position_index', 'attn_mask')


def unwrap_state_dict(checkpoint: Mapping) -> Dict[str, torch.Tensor]:
    """The state dict of a bare state dict or of a training checkpoint ({'model': ...} or {'state_dict': ...})."""
    for key in ('model', 'state_dict'):
        if isinstance(checkpoint.get(key), Mapping):
            return dict(checkpoint[key])
    return dict(checkpoint)


def rename_keys(state_dict: Mapping[str, torch.Tensor], rules: Iterable[Tuple[str, str]]) -> Dict[str, torch.Tensor]:
    """Apply (pattern, replacement) regex rules in order to every key; keys renamed to '' are dropped."""
    rules = [(re.compile(p), r) for p, r in rules]
    out = {}
    for k, v in state_dict.items():
        for pattern, repl in rules:
            k = pattern.sub(repl, k)
        if k:
            out[k] = v
    return out


def fuse_qkv(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Concatenate separate q and kv projections wherever the model has one fused qkv projection."""
    targets = model.state_dict()
    for k in [k for k in state_dict if re.search(r'\.q\.(weight|bias)$', k)]:
        prefix, param = k.rsplit('.q.', 1)
        fused = f'{prefix}.qkv.{param}'
        kv = f'{prefix}.kv.{param}'
        if fused in targets and kv in state_dict:
            state_dict[fused] = torch.cat([state_dict.pop(k), state_dict.pop(kv)], dim=0)
    return state_dict


def _square_grid(num_tokens: int, key: str) -> Tuple[int, int]:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f'cannot resize {key}: its {num_tokens} tokens are not a square grid')
    return side, side


def fit_state_dict_to_model(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Drop rebuilt buffers; resize positional encodings, position embeddings and relative position
    bias tables whose shapes differ from the model's (another training resolution or window)."""
    targets = model.state_dict()
    out = {}
    for k, v in state_dict.items():
        name = k.rsplit('.', 1)[-1]
        if name in REBUILT_BUFFERS:
            continue
        target = targets.get(k)
        if target is not None and target.shape != v.shape:
            module = model.get_submodule(k.rsplit('.', 1)[0])
            if name == 'positional_encoding' and v.ndim == 3:
                v = resample_grid_tokens(v, _square_grid(v.shape[1], k), module.key_grid_size)
                _logger.info(f'Resized {k} to the {module.key_grid_size} key grid')
            elif name == 'pos_embed' and v.ndim == 3:
                v = resample_grid_tokens(v, _square_grid(v.shape[1], k), module.grid_size)
                _logger.info(f'Resized {k} to the {module.grid_size} grid')
            elif name == 'relative_position_bias_table':
                v = resize_rel_pos_bias_table(v, new_window_size=module.window_size, new_bias_shape=target.shape)
                _logger.info(f'Resized {k} to window {module.window_size}')
        out[k] = v
    return out
