""" FocusedLinearAttention2d and C2fFocusedAttention as layers of Ultralytics model YAMLs.

    from flatten_timm.integrations.ultralytics import register
    register()
    model = YOLO('yolov8n-fla-p5.yaml')   # the scale letter picks n/s/m/l/x

The model YAMLs of this package (`yaml_names()`: yolov8-fla-p5, yolov8-c2f-fla, yolo11-fla-p5,
yolo11-c2f-fla, rtdetr-l-fla) ship inside it, and after `register()` Ultralytics finds them by name
from any working directory, as it finds its own; a file of the same name in the working directory
wins. `yaml_path(name)` gives the packaged file, to copy and edit.

`register()` wraps Ultralytics' `parse_model` (nothing in Ultralytics is edited or re-executed). Rows
naming these layers are built by Ultralytics as the stand-ins whose channel rules they share, so
channels, widths and repeats follow the YAML's `scales` exactly as for Ultralytics' own layers, then
replaced by the real layers:

- `[from, n, FocusedLinearAttention2d, [num_heads]]`: attention on the map it follows, channels kept
  (Ultralytics' rule for layers it does not know); n > 1 stacks n of them.
- `[from, n, C2fFocusedAttention, [c2, num_heads]]`: C2f's rule (input channels from the layer it
  follows, c2 scaled by width and capped by max_channels, n scaled by depth).

num_heads (optional) is lowered to the nearest count that divides the channels (default: one head per
64 channels). The key positional encoding is learned at the map size of a 640 input (P5: 20x20) and
resized to the map in use, so any imgsz and non-square images work.

Ultralytics is AGPL-3.0; it is an optional dependency (`pip install "flatten-timm[yolo]"`).
"""
import copy
import os
import re
from importlib import resources
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from flatten_timm.detection import C2fFocusedAttention
from flatten_timm.layers import FocusedLinearAttention2d

__all__ = ['SUPPORTED_VERSIONS', 'UnsupportedUltralyticsVersion', 'register', 'is_registered', 'yaml_names',
           'yaml_path']

SUPPORTED_VERSIONS = ('8.3', '8.4')  # release series whose parse_model contract this relies on
TRAIN_SIZE = 640  # the image size the positional encodings are learned at
_STAND_INS = {'FocusedLinearAttention2d': 'nn.Identity', 'C2fFocusedAttention': 'C2f'}


class UnsupportedUltralyticsVersion(RuntimeError):
    pass


def _yaml_dir() -> Path:
    return Path(str(resources.files('flatten_timm') / 'configs' / 'yolo'))


def yaml_names() -> List[str]:
    """File names of the model YAMLs that ship with flatten_timm (without a scale letter)."""
    return sorted(p.name for p in _yaml_dir().glob('*.yaml'))


def yaml_path(name: str) -> Path:
    """ The packaged model YAML of `name`: 'yolov8-fla-p5.yaml', or with a scale letter ('yolov8n-fla-p5',
    the file of every scale). Build models by name (`YOLO('yolov8n-fla-p5.yaml')`, which keeps the scale);
    this is the file to copy and edit.
    """
    stem = Path(name).name
    stem = stem[:-5] if stem.endswith('.yaml') else stem
    for candidate in (stem, re.sub(r'(\d+)[nslmx](-)', r'\1\2', stem, count=1)):
        path = _yaml_dir() / f'{candidate}.yaml'
        if path.is_file():
            return path
    raise FileNotFoundError(f'no flatten_timm model YAML named {name!r}; there are {", ".join(yaml_names())}')


def _packaged_yaml(file) -> Optional[str]:
    """The packaged YAML a bare file name asks for, unless a file of that name is in the working directory."""
    name = str(file)
    if not name.endswith('.yaml') or os.path.dirname(name) or os.path.exists(name):
        return None
    path = _yaml_dir() / name
    return str(path) if path.is_file() else None


def _wrap_check_yaml(check_yaml):
    """Ultralytics' YAML lookup (the working directory, then its own cfg folder), which also knows ours by name."""
    def check_yaml_with_flatten_yamls(file, *args, **kwargs):
        return _packaged_yaml(file) or check_yaml(file, *args, **kwargs)

    check_yaml_with_flatten_yamls.flatten_timm_wrapped = check_yaml
    return check_yaml_with_flatten_yamls


def _check_version(version: str):
    if '.'.join(version.split('.')[:2]) not in SUPPORTED_VERSIONS:
        raise UnsupportedUltralyticsVersion(
            f'flatten_timm supports Ultralytics {", ".join(v + ".x" for v in SUPPORTED_VERSIONS)}; '
            f'ultralytics {version} is installed. Install a supported release, e.g. pip install "ultralytics<8.5"')


def _num_heads(channels: int, requested=None) -> int:
    heads = max(1, int(requested) if requested else channels // 64)
    while channels % heads:
        heads -= 1
    return heads


def _probe(model: nn.Sequential, ch: int, rows: List[int]) -> Dict[int, Tuple[int, int]]:
    """(input channels, stride) of the given layers, from a forward of a small zero image through the
    layers before them, routed as Ultralytics routes them (`layer.f`)."""
    size, found, outputs = 64, {}, []
    was_training = model.training
    model.eval()
    x = torch.zeros(1, ch, size, size)
    with torch.no_grad():
        for layer in model:
            if layer.f != -1:
                x = outputs[layer.f] if isinstance(layer.f, int) else [x if j == -1 else outputs[j] for j in layer.f]
            if layer.i in rows:
                found[layer.i] = (x.shape[1], size // x.shape[-1])
                if len(found) == len(rows):
                    break
            x = layer(x)
            outputs.append(x)
    model.train(was_training)
    return found


def _real_layer(name: str, stand_in: nn.Module, extra_args: list, channels: int, stride: int) -> nn.Module:
    grid = (max(1, TRAIN_SIZE // stride),) * 2
    num_heads = extra_args[0] if extra_args else None
    if name == 'FocusedLinearAttention2d':
        count = len(stand_in) if isinstance(stand_in, nn.Sequential) else 1
        layers = [FocusedLinearAttention2d(channels, num_heads=_num_heads(channels, num_heads), grid_size=grid)
                  for _ in range(count)]
        return layers[0] if count == 1 else nn.Sequential(*layers)
    c1, c2, n = stand_in.cv1.conv.in_channels, stand_in.cv2.conv.out_channels, len(stand_in.m)
    expansion = 0.5  # C2f's: the bottlenecks run on int(c2 * expansion) channels
    return C2fFocusedAttention(c1, c2, n=n, num_heads=_num_heads(int(c2 * expansion), num_heads), grid_size=grid,
                               expansion=expansion)


def _wrap(parse_model):
    def parse_model_with_flatten_layers(d, ch, verbose=True):
        d = copy.deepcopy(d)
        ours = {}
        for i, row in enumerate(d['backbone'] + d['head']):
            name = row[2]
            if name in _STAND_INS:
                args = list(row[3])
                if name == 'C2fFocusedAttention':
                    ours[i] = (name, args[1:])
                    row[3] = args[:1]
                else:
                    ours[i] = (name, args)
                    row[3] = []
                row[2] = _STAND_INS[name]
        model, save = parse_model(d, ch, verbose=verbose)
        if ours:
            probed = _probe(model, ch, sorted(ours))
            for i, (name, extra_args) in ours.items():
                stand_in = model[i]
                layer = _real_layer(name, stand_in, extra_args, *probed[i])
                layer.i, layer.f, layer.type = stand_in.i, stand_in.f, f'flatten_timm.{name}'
                layer.np = sum(p.numel() for p in layer.parameters())
                model[i] = layer
                if verbose:  # Ultralytics' table above names the stand-in built for this row
                    from ultralytics.utils import LOGGER
                    LOGGER.info(f'{i:>3} flatten_timm: {name} ({layer.np} params) replaces the '
                                f'{type(stand_in).__name__} stand-in, input channels {probed[i][0]}, '
                                f'stride {probed[i][1]}')
        return model, save

    parse_model_with_flatten_layers.flatten_timm_wrapped = parse_model
    return parse_model_with_flatten_layers


def is_registered() -> bool:
    from ultralytics.nn import tasks
    return hasattr(tasks.parse_model, 'flatten_timm_wrapped')


def register():
    """ Make FocusedLinearAttention2d and C2fFocusedAttention usable in Ultralytics model YAMLs, and this
    package's YAMLs loadable by name (`YOLO('yolov8n-fla-p5.yaml')`) from any working directory (idempotent).
    """
    import ultralytics
    _check_version(ultralytics.__version__)
    from ultralytics.nn import tasks
    if not is_registered():
        tasks.parse_model = _wrap(tasks.parse_model)
    if not hasattr(tasks.check_yaml, 'flatten_timm_wrapped'):  # what yaml_model_load resolves names with
        tasks.check_yaml = _wrap_check_yaml(tasks.check_yaml)
