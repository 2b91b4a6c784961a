""" ONNX export of flatten_* classifiers and features_only backbones, checked against ONNX Runtime.

With `dynamic=True` the batch, height and width are dynamic axes and the graph is right at every size
the model accepts: while a graph is recorded the models take their shortcut-free path (positional
encodings resized, windows and stripes padded, rolled and masked inside the graph; see
`flatten_timm.layers.symbolic_shapes`).
"""
import contextlib
import importlib.util
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ['EXPORTERS', 'ExportError', 'OnnxCheck', 'check_onnx', 'default_check_sizes', 'export_onnx',
           'model_min_input_size']

EXPORTERS = ('torchscript', 'dynamo')
Size = Tuple[int, int]


class ExportError(ValueError):
    """An export that cannot be done as asked (bad size, missing packages, a failing exporter)."""


@dataclass
class OnnxCheck:
    """ONNX Runtime against PyTorch on one random batch."""
    batch_size: int
    img_size: Size
    max_abs_diff: float
    output_shapes: List[Tuple[int, ...]]


def _require(*modules: str):
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f'ONNX export needs {", ".join(missing)}: pip install "flatten-timm[onnx]"')


def _wrapped(model: nn.Module) -> nn.Module:
    # a features_only wrapper keeps the model it wraps as `model`
    return model if hasattr(model, 'min_input_size') else getattr(model, 'model', model)


def model_min_input_size(model: nn.Module) -> int:
    return getattr(_wrapped(model), 'min_input_size', 32)


def _check_size(model: nn.Module, img_size: Size, what: str):
    min_size = model_min_input_size(model)
    if len(img_size) != 2 or min(img_size) < min_size:
        raise ExportError(f'{what} {"x".join(map(str, img_size))} is too small: the model needs at least '
                          f'{min_size}x{min_size} pixels (its coarsest stride)')


# third-party loggers that report routine steps of an export as warnings (onnxscript's optimizer warns once
# per Split node it leaves unfolded: 20 identical lines for a tiny model)
_NOISY_LOGGERS = ('onnxscript', 'onnx_ir')


@contextlib.contextmanager
def _quiet_exporter_logs():
    """Only errors of the exporters' own loggers while an export runs; their levels are restored after."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _outputs(out) -> List[torch.Tensor]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _output_names(model: nn.Module) -> List[str]:
    feature_info = getattr(model, 'feature_info', None)
    if isinstance(feature_info, list) or not hasattr(feature_info, 'out_indices'):
        return ['logits']
    return [f'stage{i}' for i in feature_info.out_indices]


def export_onnx(
        model: nn.Module,
        output: str,
        img_size: Size = (224, 224),
        dynamic: bool = False,
        exporter: str = 'torchscript',
        opset: Optional[int] = None,
) -> Path:
    """ Write `model` (a classifier or a features_only backbone, in eval mode) as ONNX.

    Input 'images' (B, model.in_chans, H, W); outputs 'logits', or 'stage{i}' per feature map.
    dynamic: batch, height and width are dynamic axes (any size of at least the model's minimum).
    exporter: 'torchscript' (torch.onnx's tracing exporter) or 'dynamo' (dynamo=True, through torch.export).
    """
    _require('onnx')
    if exporter not in EXPORTERS:
        raise ExportError(f'exporter must be one of {EXPORTERS}, got {exporter!r}')
    if exporter == 'dynamo':
        _require('onnxscript')
    _check_size(model, img_size, 'the export size')
    model = model.eval()
    device = next(model.parameters()).device
    # batch 2 while recording a dynamic graph: torch.export would otherwise specialise the batch to 1
    example = torch.randn(2 if dynamic else 1, _wrapped(model).in_chans, *img_size, device=device)
    names = _output_names(model)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    kwargs = dict(input_names=['images'], output_names=names, opset_version=opset)
    with torch.no_grad(), warnings.catch_warnings(), _quiet_exporter_logs():
        # shape checks on traced sizes warn that they are constants in the graph: they are only checks
        warnings.filterwarnings('ignore', category=torch.jit.TracerWarning)
        try:
            if exporter == 'dynamo':
                dynamic_shapes = None
                if dynamic:
                    min_size = model_min_input_size(model)
                    dynamic_shapes = ({0: torch.export.Dim('batch', min=1),
                                       2: torch.export.Dim('height', min=min_size),
                                       3: torch.export.Dim('width', min=min_size)},)
                torch.onnx.export(model, (example,), str(output), dynamo=True, dynamic_shapes=dynamic_shapes,
                                  external_data=False, verbose=False, **kwargs)
            else:
                dynamic_axes = None
                if dynamic:
                    dynamic_axes = {'images': {0: 'batch', 2: 'height', 3: 'width'}}
                    dynamic_axes.update({name: {0: 'batch'} for name in names})
                    if names != ['logits']:
                        dynamic_axes.update({name: {0: 'batch', 2: f'{name}_height', 3: f'{name}_width'}
                                             for name in names})
                torch.onnx.export(model, (example,), str(output), dynamo=False, dynamic_axes=dynamic_axes, **kwargs)
        except ExportError:
            raise
        except Exception as e:  # the exporters raise many types; say which model and exporter failed
            raise ExportError(f'the {exporter} exporter failed: {type(e).__name__}: {e}') from e
    import onnx
    onnx.checker.check_model(str(output))
    if dynamic:
        dims = onnx.load(str(output), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
        fixed = [name for name, d in zip(('batch', 'height', 'width'), (dims[0], dims[2], dims[3])) if d.dim_value]
        if fixed:
            output.unlink()
            other = EXPORTERS[1 - EXPORTERS.index(exporter)]
            raise ExportError(
                f'the {exporter} exporter fixed the {", ".join(fixed)} of this model (it could not keep its shape '
                f'arithmetic symbolic), so the graph would only run at the export size; try exporter={other!r} '
                f'(--exporter {other})')
    return output


def default_check_sizes(img_size: Size, min_size: int = 32) -> List[Size]:
    """The export size and two others, non-square and not multiples of 32 (one larger, one smaller)."""
    H, W = img_size
    larger = (H + H // 4 + 4, W + W // 2 + 8)
    smaller = (max(min_size, H * 3 // 4 - 4), max(min_size, W - W // 8 + 4))
    return [tuple(img_size), larger, smaller]


def check_onnx(
        path: str,
        model: nn.Module,
        sizes: Sequence[Size],
        batch_size: int = 1,
        seed: int = 0,
) -> List[OnnxCheck]:
    """Run the ONNX file in ONNX Runtime (CPU) and the model in PyTorch on the same random batch at each size."""
    _require('onnxruntime')
    import onnxruntime as ort
    for size in sizes:
        _check_size(model, size, 'the check size')
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    input_name = session.get_inputs()[0].name
    model = model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    results = []
    for size in sizes:
        x = torch.randn(batch_size, _wrapped(model).in_chans, *size, generator=generator)
        with torch.no_grad():
            expected = [t.float().cpu().numpy() for t in _outputs(model(x.to(device)))]
        got = session.run(None, {input_name: x.numpy()})
        if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected)):
            raise ExportError(f'at {size[0]}x{size[1]} ONNX Runtime gives shapes {[g.shape for g in got]}, '
                              f'PyTorch {[e.shape for e in expected]}')
        diff = max(float(abs(g - e).max()) for g, e in zip(got, expected))
        results.append(OnnxCheck(batch_size, tuple(size), diff, [tuple(e.shape) for e in expected]))
    return results
