""" Ultralytics: the packaged YAMLs (flatten_timm/configs/yolo) build at every scale with the heads they ask,
train one epoch, reload in a fresh process."""
import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

ultralytics = pytest.importorskip('ultralytics')
from flatten_timm.detection import C2fFocusedAttention  # noqa: E402
from flatten_timm.integrations import ultralytics as flatten_ultralytics  # noqa: E402
from flatten_timm.layers import FocusedLinearAttention2d  # noqa: E402

CONFIGS = flatten_ultralytics.yaml_path('yolov8-fla-p5.yaml').parent  # the YAMLs the package ships
WIDTH = {  # scale -> (depth, width, max_channels), as in the YAMLs
    'yolov8': {'n': (0.33, 0.25, 1024), 's': (0.33, 0.50, 1024), 'm': (0.67, 0.75, 768)},
    'yolo11': {'n': (0.50, 0.25, 1024), 's': (0.50, 0.50, 1024), 'm': (0.50, 1.00, 512)},
}


@pytest.fixture(scope='module', autouse=True)
def registered():
    flatten_ultralytics.register()


def _build(model_cls, name: str):
    """model_cls('<name>.yaml') of the packaged YAMLs, the scale letter in the name (yolov8n-fla-p5 is yolov8-fla-p5
    at scale n). Ultralytics finds that letter with a regex over the whole path, which a folder such as
    /tmp/tmp.i2Kw2mqd also matches: the model is built from the bare file name, in the YAMLs' folder."""
    cwd = os.getcwd()
    os.chdir(CONFIGS)
    try:
        return model_cls(f'{name}.yaml')
    finally:
        os.chdir(cwd)


def _scaled(channels: int, scale) -> int:
    depth, width, max_channels = scale
    return int(np.ceil(min(channels, max_channels) * width / 8) * 8)


def _layers(model, cls):
    return {i: m for i, m in enumerate(model.model.model) if isinstance(m, cls)}


def _expected_attention(config: dict, scale: str) -> dict:
    """Row index -> (channels, heads asked, heads) of every attention a YAML asks for, from the YAML alone.

    A FocusedLinearAttention2d keeps the channels of the row it follows (SPPF or Conv here: c2 scaled), a
    C2fFocusedAttention attends on half its scaled c2. Heads as register() documents them: the YAML's count
    (default one per 64 channels, at least one), lowered to the nearest count that divides the channels.
    """
    depth, width, max_channels = config['scales'][scale]
    rows = config['backbone'] + config['head']
    expected = {}
    for i, (source, repeats, module, args) in enumerate(rows):
        if module == 'FocusedLinearAttention2d':
            assert source == -1 and rows[i - 1][2] in ('SPPF', 'Conv')
            channels, asked = _scaled(rows[i - 1][3][0], (depth, width, max_channels)), args[:1]
        elif module == 'C2fFocusedAttention':
            channels, asked = _scaled(args[0], (depth, width, max_channels)) // 2, args[1:2]
        else:
            continue
        asked = asked[0] if asked else max(1, channels // 64)
        expected[i] = (channels, asked, max(h for h in range(1, asked + 1) if channels % h == 0))
    return expected


def _attention_layers(layer) -> list:
    return [layer] if isinstance(layer, FocusedLinearAttention2d) else [block.attn for block in layer.blocks]


def _check_heads(model: torch.nn.Sequential, config: dict, scale: str):
    built = {i: m for i, m in enumerate(model) if isinstance(m, (FocusedLinearAttention2d, C2fFocusedAttention))}
    expected = _expected_attention(config, scale)
    assert sorted(built) == sorted(expected)
    for i, (channels, _, heads) in expected.items():
        for attn in _attention_layers(built[i]):
            assert (attn.dim, attn.num_heads) == (channels, heads), (i, scale)
            assert attn.head_dim * heads == channels and attn.dwc.in_channels == attn.head_dim  # per-head conv


def _parse(config: dict, scale: str) -> torch.nn.Sequential:
    """The layers Ultralytics builds for a YAML at one scale; on the meta device (shapes only, no weights),
    so that the l and x scales cost little."""
    from ultralytics.nn import tasks
    with torch.device('meta'):
        model, _ = tasks.parse_model(dict(copy.deepcopy(config), scale=scale), ch=3, verbose=False)
    return model


@pytest.mark.parametrize('name', sorted(p.stem for p in CONFIGS.glob('*.yaml')))
def test_heads_are_what_the_yaml_asks_at_every_scale(name):
    config = yaml.safe_load((CONFIGS / f'{name}.yaml').read_text())
    for scale in config['scales']:
        _check_heads(_parse(config, scale), config, scale)


# rows given head counts that do not divide their channels at some scale, or none (one per 64 channels)
HEAD_VARIANTS = {
    'yolov8-fla-p5': {10: [12]},  # 256, 512, 576, 512, 640 channels at n-x: 8, 8, 12, 8, 10 heads
    'yolo11-fla-p5': {10: []},
    'yolov8-c2f-fla': {12: [512, 3], 15: [256, 6], 18: [512], 21: [1024, 7]},
}


def test_head_counts_that_do_not_divide_are_lowered():
    lowered = []
    for name, variant in HEAD_VARIANTS.items():
        config = yaml.safe_load((CONFIGS / f'{name}.yaml').read_text())
        rows = config['backbone'] + config['head']
        for i, args in variant.items():
            rows[i][3] = args
        for scale in config['scales']:
            _check_heads(_parse(config, scale), config, scale)
            lowered += [(name, scale, asked, heads) for channels, asked, heads
                        in _expected_attention(config, scale).values() if heads < asked]
    assert len(lowered) > 10, lowered  # the variants do exercise the lowering


@pytest.mark.parametrize('family', ['yolov8', 'yolo11'])
@pytest.mark.parametrize('scale', ['n', 's', 'm'])
def test_attention_after_p5_builds_at_every_scale(family, scale):
    from ultralytics import YOLO
    model = _build(YOLO, f'{family}{scale}-fla-p5')
    (index, attn), = _layers(model, FocusedLinearAttention2d).items()
    channels = _scaled(1024, WIDTH[family][scale])
    assert index == 10 and attn.dim == channels
    assert attn.num_heads == 8 and attn.key_grid_size == (20, 20)  # P5 of a 640 image


@pytest.mark.parametrize('family', ['yolov8', 'yolo11'])
@pytest.mark.parametrize('scale', ['n', 's', 'm'])
def test_neck_blocks_build_at_every_scale(family, scale):
    from ultralytics import YOLO
    model = _build(YOLO, f'{family}{scale}-c2f-fla')
    blocks = _layers(model, C2fFocusedAttention)
    depth = WIDTH[family][scale][0]
    repeats = max(round((3 if family == 'yolov8' else 2) * depth), 1)
    first = 12 if family == 'yolov8' else 13
    assert sorted(blocks) == [first, first + 3, first + 6, first + 9]
    for index, c2, heads in zip(sorted(blocks), (512, 256, 512, 1024), (4, 2, 4, 8)):
        block = blocks[index]
        assert block.conv_out.conv.out_channels == _scaled(c2, WIDTH[family][scale])
        assert len(block.blocks) == repeats
        # the YAML's heads, on half the block's channels (they divide at every scale of these YAMLs)
        assert all((b.attn.dim, b.attn.num_heads) == (_scaled(c2, WIDTH[family][scale]) // 2, heads)
                   for b in block.blocks)
    # the P3 block learns its positional encoding at the P3 map of a 640 image
    assert blocks[first + 3].blocks[0].attn.key_grid_size == (80, 80)


@pytest.mark.parametrize('name', ['yolov8n-fla-p5', 'yolov8n-c2f-fla', 'yolo11n-fla-p5', 'yolo11n-c2f-fla',
                                  'rtdetr-l-fla'])
def test_detection_outputs_at_640_and_non_square(name):
    from ultralytics import RTDETR, YOLO
    model = _build(RTDETR if name.startswith('rtdetr') else YOLO, name).model.eval()
    for size, anchors in (((640, 640), 8400), ((480, 800), 7875)):
        with torch.no_grad():
            out = model(torch.zeros(1, 3, *size))
        out = out[0] if isinstance(out, (list, tuple)) else out
        if name.startswith('rtdetr'):
            assert out.shape == (1, 300, 6)  # 300 queries: box (x1, y1, x2, y2), score, class
        else:
            assert out.shape == (1, 4 + 80, anchors)  # boxes and class scores per anchor
        assert torch.isfinite(out).all()


def test_register_is_idempotent():
    from ultralytics.nn import tasks
    flatten_ultralytics.register()
    wrapped = tasks.parse_model
    flatten_ultralytics.register()
    assert tasks.parse_model is wrapped and flatten_ultralytics.is_registered()
    assert not hasattr(wrapped.flatten_timm_wrapped, 'flatten_timm_wrapped')  # wrapped once


def test_unsupported_version_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(ultralytics, '__version__', '9.1.0')
    with pytest.raises(flatten_ultralytics.UnsupportedUltralyticsVersion,
                       match=r'supports Ultralytics 8\.3\.x, 8\.4\.x; ultralytics 9\.1\.0 is installed'):
        flatten_ultralytics.register()


def write_tiny_yolo_dataset(root: Path, images: int = 4) -> Path:
    """A few 64x96 PNGs with coloured boxes of two classes, YOLO-format labels, and data.yaml."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ('train', 'val'):
        (root / 'images' / split).mkdir(parents=True)
        (root / 'labels' / split).mkdir(parents=True)
        for i in range(images):
            image, lines = np.full((64, 96, 3), 40, np.uint8), []
            for _ in range(2):
                w, h = rng.integers(12, 30, 2)
                x, y, cls = rng.integers(0, 96 - w), rng.integers(0, 64 - h), int(rng.integers(0, 2))
                image[y:y + h, x:x + w] = (220, 60, 60) if cls == 0 else (60, 220, 60)
                lines.append(f'{cls} {(x + w / 2) / 96:.4f} {(y + h / 2) / 64:.4f} {w / 96:.4f} {h / 64:.4f}')
            Image.fromarray(image).save(root / 'images' / split / f'{i}.png')
            (root / 'labels' / split / f'{i}.txt').write_text('\n'.join(lines) + '\n')
    data = root / 'data.yaml'
    data.write_text(f'path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: red\n  1: green\n')
    return data


@pytest.mark.parametrize('name', ['yolov8n-fla-p5', 'yolov8n-c2f-fla', 'yolo11n-fla-p5', 'yolo11n-c2f-fla',
                                  'rtdetr-l-fla'])
def test_train_one_epoch_then_reload_in_a_fresh_process(tmp_path, monkeypatch, name):
    from ultralytics import RTDETR, YOLO
    data = write_tiny_yolo_dataset(tmp_path / 'data')
    model_cls = RTDETR if name.startswith('rtdetr') else YOLO
    # the trainer reads the YAML again by the name it was given: the YAMLs beside the run (see _build)
    for config in CONFIGS.glob('*.yaml'):
        shutil.copy(config, tmp_path)
    monkeypatch.chdir(tmp_path)
    model = model_cls(f'{name}.yaml')
    ours = sorted({type(m).__name__ for m in model.model.modules()
                   if isinstance(m, (FocusedLinearAttention2d, C2fFocusedAttention))})
    model.train(data=str(data), epochs=1, imgsz=64, batch=4, device='cpu', workers=0, plots=False, amp=False,
                project=str(tmp_path / 'runs'), name='fla', exist_ok=True, verbose=False)
    losses = model.trainer.tloss
    losses = list(losses.values()) if isinstance(losses, dict) else list(losses)
    assert losses and all(torch.isfinite(torch.as_tensor(v)).all() for v in losses)
    best = Path(model.trainer.best)
    assert best.exists()
    script = (
        'import numpy as np\n'
        'from flatten_timm.integrations.ultralytics import register\n'
        'register()\n'
        f'from ultralytics import {model_cls.__name__} as Model\n'
        f'model = Model({str(best)!r})\n'
        'result = model.predict(np.zeros((48, 80, 3), np.uint8), imgsz=(64, 96), device="cpu", verbose=False)[0]\n'
        'names = sorted({type(m).__name__ for m in model.model.modules()\n'
        '                if type(m).__name__ in ("FocusedLinearAttention2d", "C2fFocusedAttention")})\n'
        'print(names, result.orig_shape, tuple(result.boxes.data.shape[1:]))\n')
    out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == f'{ours} (48, 80) (6,)'


def test_corrupt_image_is_a_clear_error_with_ultralytics_imported(tmp_path):
    # Ultralytics patches PIL.Image.open to retry undecodable files with an optional HEIF plugin (ImportError)
    from ultralytics import YOLO  # noqa: F401
    from flatten_timm.cli import main
    (tmp_path / 'bad.png').write_text('not an image')
    with pytest.raises(SystemExit, match='cannot read image .*not an image file Pillow can decode'):
        main(['predict', '--model', 'flatten_pvt_v2_b0', str(tmp_path / 'bad.png')])


@pytest.mark.parametrize('name', ['yolov8n-fla-p5', 'yolo11n-c2f-fla'])
def test_ultralytics_onnx_export_with_dynamic_sizes(tmp_path, monkeypatch, name):
    """Ultralytics' own export (dynamic=True) of these models runs in ONNX Runtime at other sizes too."""
    ort = pytest.importorskip('onnxruntime')
    from ultralytics import YOLO
    monkeypatch.chdir(tmp_path)
    model = _build(YOLO, name)
    path = model.export(format='onnx', imgsz=(96, 128), dynamic=True, simplify=False)
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    net = model.model.float().eval()
    for size in ((96, 128), (160, 96)):
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            expected = net(x)
        expected = (expected[0] if isinstance(expected, (list, tuple)) else expected).numpy()
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        assert got.shape == expected.shape
        # boxes are in pixels (up to the image size): compare relative to the largest output
        assert np.abs(got - expected).max() < 1e-5 * max(1.0, np.abs(expected).max()), np.abs(got - expected).max()
