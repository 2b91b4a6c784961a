""" Loading checkpoints safely: official FLatten training checkpoints, this project's files, safetensors.

The released FLatten checkpoints are pickles of a whole training state: the model's state dict
under 'model', and possibly an optimizer, a scheduler and a yacs `CfgNode` config.
`torch.load(weights_only=True)` refuses them, and `weights_only=False` would run whatever code the
pickle names. The unpickler here rebuilds tensors and plain containers only; any other global
becomes an inert placeholder that is never called, so a checkpoint cannot run code.
"""
import builtins
import collections
import logging
import os
import pickle
import types
import zipfile
from typing import Any, Callable, Dict, Mapping, Optional

import torch
import torch.nn as nn

_logger = logging.getLogger(__name__)

__all__ = ['CheckpointError', 'InertObject', 'safe_torch_load', 'load_checkpoint_file', 'load_weights_into',
           'create_model_from_checkpoint']

STATE_DICT_KEYS = ('model', 'state_dict', 'model_ema', 'state_dict_ema')


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model."""


class InertObject(dict):
    """ Stands in for any object a checkpoint names that is not a tensor or a plain container.

    It records what it was given (so a stand-in config can still be inspected) and does nothing else.
    """
    qualname = 'unknown'

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def append(self, item):
        self.setdefault('_items', []).append(item)

    def extend(self, items):
        self.setdefault('_items', []).extend(items)

    def __repr__(self):
        return f'<inert {self.qualname}>'


def _inert(module: str, name: str) -> type:
    return type(name, (InertObject,), {'qualname': f'{module}.{name}', '__module__': __name__})


_SAFE_BUILTINS = {'set', 'frozenset', 'dict', 'list', 'tuple', 'int', 'float', 'complex', 'bool', 'str',
                  'bytes', 'bytearray', 'slice'}
_SAFE_GLOBALS = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor'): torch._utils._rebuild_tensor,
    ('torch._utils', '_rebuild_tensor_v2'): torch._utils._rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): torch._utils._rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): torch._utils._rebuild_parameter_with_state,
    ('torch', 'Size'): torch.Size,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds tensors, storages, dtypes and plain containers; everything else becomes an InertObject."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module == 'builtins' and name in _SAFE_BUILTINS:
            return getattr(builtins, name)
        if module == 'torch' and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        _logger.debug(f'checkpoint names {module}.{name}: replaced by an inert placeholder')
        return _inert(module, name)


# torch.load takes a pickle module: this one has the restricted Unpickler
_restricted_pickle = types.ModuleType('flatten_timm_restricted_pickle')
_restricted_pickle.Unpickler = _RestrictedUnpickler
_restricted_pickle.load = lambda file, **kwargs: _RestrictedUnpickler(file, **kwargs).load()
_restricted_pickle.__name__ = 'pickle'  # torch checks the name only for its own legacy paths


def safe_torch_load(path: str, map_location='cpu') -> Any:
    """torch.load that rebuilds tensors and containers but never executes code named by the pickle."""
    try:
        return torch.load(path, map_location=map_location, pickle_module=_restricted_pickle, weights_only=False)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, TypeError,
            AttributeError, IndexError, KeyError) as e:
        raise CheckpointError(
            f'{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]}). '
            f'The file may be truncated or corrupt (download it again), or not a checkpoint at all.') from e


def _pick_state_dict(checkpoint: Any, path: str, key: Optional[str]) -> Dict[str, torch.Tensor]:
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f'{path} holds a {type(checkpoint).__name__}, not a state dict or training checkpoint')
    if key is not None:
        if not isinstance(checkpoint.get(key), Mapping):
            found = [k for k in STATE_DICT_KEYS if isinstance(checkpoint.get(k), Mapping)]
            raise CheckpointError(f'{path} has no state dict under {key!r}; it has {found or "none"}')
        checkpoint = checkpoint[key]
    else:
        for candidate in STATE_DICT_KEYS:
            if isinstance(checkpoint.get(candidate), Mapping):
                checkpoint = checkpoint[candidate]
                break
    state_dict = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not state_dict:
        raise CheckpointError(f'{path} contains no tensors: it is not a model checkpoint')
    return state_dict


def _strip_wrapper_prefix(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Keys of weights saved from a DataParallel / DDP wrapper, which puts 'module.' before each."""
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state_dict.items()}


def load_checkpoint_file(path: str, key: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """ The state dict in a .safetensors file, or in a PyTorch file (bare, or a training checkpoint).

    Args:
        path: the file.
        key: which entry of a training checkpoint to take ('model', 'model_ema', 'state_dict');
            by default 'model', else 'state_dict', else the EMA weights if they are all there is.

    Keys saved from a DataParallel / DDP wrapper lose their 'module.' prefix.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint file not found: {path}')
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        try:
            return _strip_wrapper_prefix(load_file(path))
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise CheckpointError(
                f'{path} is not a valid safetensors file ({e}); it may be truncated or corrupt') from e
    return _strip_wrapper_prefix(_pick_state_dict(safe_torch_load(path), path, key))


def _summarise(keys, limit: int = 5) -> str:
    keys = sorted(keys)
    shown = ', '.join(keys[:limit])
    return f'{len(keys)} ({shown}{", ..." if len(keys) > limit else ""})'


def load_weights_into(
        model: nn.Module,
        state_dict: Dict[str, torch.Tensor],
        filter_fn: Optional[Callable] = None,
        classifier: str = 'head',
) -> None:
    """ Convert (filter_fn) and load a state dict; a classifier of another class count is left re-initialised.

    Raises CheckpointError, with the mismatches summarised, when the checkpoint is of another architecture.
    """
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    target = model.state_dict()
    head_keys = [k for k in (f'{classifier}.weight', f'{classifier}.bias') if k in state_dict]
    if any(k not in target or target[k].shape != state_dict[k].shape for k in head_keys):
        _logger.info(f'Classifier {classifier!r} of the checkpoint has another shape: re-initialised, not loaded')
        for k in head_keys:
            state_dict.pop(k)
    missing = set(target) - set(state_dict) - {k for k in target if k.startswith(f'{classifier}.')}
    unexpected = set(state_dict) - set(target)
    mismatched = {k for k in set(state_dict) & set(target) if state_dict[k].shape != target[k].shape}
    if missing or unexpected or mismatched:
        name = getattr(model, 'pretrained_cfg', {}).get('architecture', type(model).__name__)
        problems = []
        if missing:
            problems.append(f'missing keys: {_summarise(missing)}')
        if unexpected:
            problems.append(f'unexpected keys: {_summarise(unexpected)}')
        if mismatched:
            problems.append(f'shape mismatches: {_summarise(mismatched)}')
        raise CheckpointError(
            f'checkpoint does not fit {name}: ' + '; '.join(problems) +
            '. Is it a checkpoint of another architecture or variant?')
    model.load_state_dict(state_dict, strict=False)


def create_model_from_checkpoint(model_name: str, path: str, key: Optional[str] = None, **kwargs) -> nn.Module:
    """ timm.create_model(model_name) with the weights of a checkpoint file, official or this project's.

    The classifier takes the checkpoint's class count, so a fine-tuned file predicts its own classes.
    """
    import timm
    state_dict = load_checkpoint_file(path, key)
    head = state_dict.get('head.weight')
    if head is not None and head.ndim == 2:
        kwargs.setdefault('num_classes', head.shape[0])
    model = timm.create_model(model_name, pretrained=False, **kwargs)
    if not hasattr(model, 'load_weights'):
        raise CheckpointError(f'{model_name} is not a flatten_timm model; load its checkpoint with timm instead')
    model.load_weights(state_dict)
    return model
