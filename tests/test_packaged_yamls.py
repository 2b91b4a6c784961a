""" The Ultralytics model YAMLs and the model table ship inside the package; the YAMLs load by name from
any working directory after register()."""
import re
import sys
from importlib import resources
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
YAMLS = ['rtdetr-l-fla.yaml', 'yolo11-c2f-fla.yaml', 'yolo11-fla-p5.yaml', 'yolov8-c2f-fla.yaml', 'yolov8-fla-p5.yaml']


def test_package_data_is_declared_and_present():
    package = resources.files('flatten_timm')
    assert sorted(p.name for p in (package / 'configs' / 'yolo').iterdir() if p.name.endswith('.yaml')) == YAMLS
    assert (package / 'model_zoo.json').is_file()
    if sys.version_info >= (3, 11):  # what a wheel takes: the declared package data
        import tomllib
        declared = tomllib.loads((REPO / 'pyproject.toml').read_text())['tool']['setuptools']['package-data']
        assert 'model_zoo.json' in declared['flatten_timm'] and '*.yaml' in declared['flatten_timm.configs.yolo']


ultralytics = pytest.importorskip('ultralytics')
from flatten_timm.integrations import ultralytics as flatten_ultralytics  # noqa: E402


@pytest.fixture(autouse=True)
def registered():
    flatten_ultralytics.register()


def _attention_layers(model):
    return [type(m).__name__ for m in model.model.modules()
            if type(m).__name__ in ('FocusedLinearAttention2d', 'C2fFocusedAttention')]


def test_yamls_load_by_name_from_another_working_directory(tmp_path, monkeypatch):
    from ultralytics import RTDETR, YOLO
    monkeypatch.chdir(tmp_path)  # no configs/ here
    model = YOLO('yolov8n-fla-p5.yaml')
    assert _attention_layers(model) == ['FocusedLinearAttention2d'] and model.model.yaml['scale'] == 'n'
    assert model.model.model[10].dim == 256  # scale n: 1024 channels x 0.25
    assert 'C2fFocusedAttention' in _attention_layers(RTDETR('rtdetr-l-fla.yaml'))
    assert flatten_ultralytics.yaml_names() == YAMLS
    assert flatten_ultralytics.yaml_path('yolo11s-c2f-fla.yaml').name == 'yolo11-c2f-fla.yaml'
    with pytest.raises(FileNotFoundError, match='no flatten_timm model YAML named .*yolov8-fla-p6'):
        flatten_ultralytics.yaml_path('yolov8-fla-p6.yaml')


def test_a_yaml_in_the_working_directory_wins(tmp_path, monkeypatch):
    from ultralytics import YOLO
    text = flatten_ultralytics.yaml_path('yolov8-fla-p5.yaml').read_text().replace('nc: 80', 'nc: 3')
    (tmp_path / 'yolov8-fla-p5.yaml').write_text(text)
    monkeypatch.chdir(tmp_path)
    assert YOLO('yolov8n-fla-p5.yaml').model.yaml['nc'] == 3


def test_readme_size_table_is_what_ultralytics_counts():
    """One row of the README's params / GFLOPs table against Ultralytics' model_info (scripts/yolo_info.py)."""
    from ultralytics import YOLO
    from ultralytics.utils.torch_utils import model_info
    readme = (REPO / 'README.md').read_text(encoding='utf-8')
    row = re.search(r'^\| yolov8n-fla-p5 \| ([\d.]+) \| ([\d.]+) \| yolov8n \| ([\d.]+) \| ([\d.]+) \|$', readme, re.M)
    assert row, 'the README has no yolov8n-fla-p5 row'
    for model, (params, gflops) in ((YOLO('yolov8n-fla-p5.yaml'), row.groups()[:2]),
                                    (YOLO('yolov8n.yaml'), row.groups()[2:])):
        _, counted_params, _, counted_gflops = model_info(model.model, verbose=True, imgsz=640)
        assert f'{counted_params / 1e6:.2f}' == params and f'{counted_gflops:.1f}' == gflops, \
            'regenerate the table with python scripts/yolo_info.py'
