""" ONNX export (flatten_timm.export, `flatten-timm export`): dynamic graphs right at every size, both exporters."""
import warnings

import pytest
import timm
import torch

pytest.importorskip('onnxruntime')
from flatten_timm.cli import main  # noqa: E402
from flatten_timm.export import ExportError, check_onnx, default_check_sizes, export_onnx  # noqa: E402
from test_models import TINY  # noqa: E402

EXPORT_SIZE = (64, 64)
# the export size, one larger and one smaller, non-square and not multiples of 32: windows and stripes
# then pad, shift and shrink differently in every stage
CHECK_SIZES = default_check_sizes(EXPORT_SIZE)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the exporters' deprecation and tracer notices
        yield


def test_check_sizes_are_awkward():
    assert CHECK_SIZES[0] == EXPORT_SIZE
    assert all(h != w and h % 32 and w % 32 for h, w in CHECK_SIZES[1:])


def _export_and_check(tmp_path, model, exporter, sizes=CHECK_SIZES):
    path = export_onnx(model, tmp_path / 'model.onnx', EXPORT_SIZE, dynamic=True, exporter=exporter)
    checks = check_onnx(path, model, sizes, batch_size=2)
    for check in checks:
        assert check.max_abs_diff < 1e-4, check
    return checks


@pytest.mark.parametrize('name', sorted(TINY))
def test_dynamic_classifier_torchscript(tmp_path, name):
    model = timm.create_model(name, **TINY[name])
    checks = _export_and_check(tmp_path, model, 'torchscript', CHECK_SIZES + [(32, 200)])
    assert [c.output_shapes for c in checks] == [[(2, 1000)]] * 4


@pytest.mark.parametrize('name', sorted(TINY))
def test_dynamic_features_torchscript(tmp_path, name):
    model = timm.create_model(name, features_only=True, **TINY[name])
    checks = _export_and_check(tmp_path, model, 'torchscript')
    channels = model.feature_info.channels()
    for check in checks:
        H, W = check.img_size
        assert check.output_shapes == [
            (2, c, -(-H // r), -(-W // r)) for c, r in zip(channels, model.feature_info.reduction())]


# torch.export takes 20-60 s per model here
@pytest.mark.parametrize('name', sorted(TINY))
def test_dynamic_dynamo(tmp_path, name):
    pytest.importorskip('onnxscript')
    _export_and_check(tmp_path, timm.create_model(name, **TINY[name]), 'dynamo')


def test_bad_arguments(tmp_path):
    model = timm.create_model('flatten_pvt_v2_b0', **TINY['flatten_pvt_v2_b0'])
    with pytest.raises(ExportError, match='too small: the model needs at least 32x32'):
        export_onnx(model, tmp_path / 'm.onnx', (16, 64))
    with pytest.raises(ExportError, match='exporter must be one of'):
        export_onnx(model, tmp_path / 'm.onnx', EXPORT_SIZE, exporter='tflite')


def test_a_graph_with_fixed_sizes_is_refused(tmp_path, monkeypatch):
    real_export = torch.onnx.export

    def export_without_dynamic_axes(*args, dynamic_axes=None, **kwargs):
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, 'export', export_without_dynamic_axes)
    model = timm.create_model('flatten_pvt_v2_b0', **TINY['flatten_pvt_v2_b0'])
    path = tmp_path / 'm.onnx'
    with pytest.raises(ExportError, match="fixed the batch, height, width .* try exporter='dynamo'"):
        export_onnx(model, path, EXPORT_SIZE, dynamic=True)
    assert not path.exists()


def test_cli_export(tmp_path, capsys):
    out = tmp_path / 'b0.onnx'
    assert main(['export', '--model', 'flatten_pvt_v2_b0', '--features-only', '--dynamic',
                 '--img-size', '64', '96', '--output', str(out)]) == 0
    text = capsys.readouterr().out
    assert out.exists() and 'onnx.checker passed' in text
    # three sizes checked, four stage maps each
    lines = [line for line in text.splitlines() if 'max |difference|' in line]
    assert len(lines) == 3 and all(line.count('x') >= 10 for line in lines)
    assert all(float(line.split('max |difference| ')[1].split()[0]) < 1e-4 for line in lines)


def test_cli_export_errors(tmp_path, capsys):
    assert main(['export', '--model', 'flatten_nope', '--output', str(tmp_path / 'x.onnx')]) == 2
    assert 'Unknown model' in capsys.readouterr().err
    assert main(['export', '--model', 'flatten_pvt_v2_b0', '--img-size', '16', '40',
                 '--output', str(tmp_path / 'x.onnx')]) == 2
    assert 'too small' in capsys.readouterr().err


def test_cli_export_static_with_opset(tmp_path, capsys, monkeypatch):
    """Without --dynamic (the default) the graph takes one fixed size, 1x3xHxW as asked; --opset sets the file's
    ONNX opset (the exporter's default is 20 here); and ONNX Runtime gives the model's outputs at that size. The
    weights go through --checkpoint, so that the test holds the same model (the tiny configuration, which the
    command builds too)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from safetensors.torch import save_file
    create_model = timm.create_model
    monkeypatch.setattr(timm, 'create_model', lambda name, **kwargs: create_model(name, **{**TINY[name], **kwargs}))
    model = timm.create_model('flatten_pvt_v2_b0', num_classes=5).eval()
    weights = tmp_path / 'b0.safetensors'
    save_file(model.state_dict(), str(weights))
    out = tmp_path / 'static.onnx'
    assert main(['export', '--model', 'flatten_pvt_v2_b0', '--checkpoint', str(weights), '--img-size', '64', '96',
                 '--opset', '17', '--output', str(out)]) == 0
    text = capsys.readouterr().out
    assert 'fixed size 1x3x64x96' in text and text.count('max |difference|') == 1

    proto = onnx.load(str(out))
    assert {o.domain: o.version for o in proto.opset_import}[''] == 17
    (images,), (logits,) = proto.graph.input, proto.graph.output
    assert [d.dim_value for d in images.type.tensor_type.shape.dim] == [1, 3, 64, 96]
    assert [d.dim_value for d in logits.type.tensor_type.shape.dim] == [1, 5]

    session = ort.InferenceSession(str(out), providers=['CPUExecutionProvider'])
    x = torch.randn(1, 3, 64, 96)
    (got,) = session.run(None, {'images': x.numpy()})
    with torch.no_grad():
        expected = model(x).numpy()
    assert got.shape == (1, 5) and np.abs(got - expected).max() < 1e-4, np.abs(got - expected).max()
    with pytest.raises(Exception, match='(?i)dimension|shape'):  # the fixed graph takes no other size
        session.run(None, {'images': torch.randn(1, 3, 96, 64).numpy()})
