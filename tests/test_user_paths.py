""" What a new user runs: a trained checkpoint used at its own size and classes, offline pretrained weights,
the model table, progress of long commands, the small errors, and the README's getting-started path."""
import json
import logging
import os
import re
import subprocess
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from flatten_timm.cli import build_parser, main
from conftest import load_script

REPO = Path(__file__).resolve().parents[1]
CLASSES = ('cat', 'dog')  # folder names, in label order


def _load_script(name: str):
    return load_script(f'scripts/{name}.py')


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A 2-class image folder, and one epoch plus one cool-down epoch of scripts/train.py at 64 px on it."""
    root = tmp_path_factory.mktemp('user')
    rng = np.random.default_rng(0)
    for split, count in (('train', 4), ('val', 2)):
        for name, colour in zip(CLASSES, ((220, 40, 40), (40, 40, 220))):
            folder = root / 'pets' / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.array(colour)[None, None] * rng.uniform(0.6, 1.0) + rng.normal(0, 25, (48, 40, 3))
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f'{i}.png')
    train = _load_script('train')
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger('train')
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        train.main(['--data-dir', str(root / 'pets'), '--model', 'flatten_pvt_v2_b0', '--img-size', '64', '-b', '4',
                    '--workers', '0', '--epochs', '1', '--cooldown-epochs', '1', '--warmup-epochs', '0',
                    '--lr', '0.02', '--smoothing', '0', '--seed', '1', '--output', str(root / 'runs'),
                    '--experiment', 'run'])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    run = root / 'runs' / 'run'
    rows = [json.loads(line) for line in (run / 'summary.jsonl').read_text().splitlines()]
    return dict(root=root, data=root / 'pets', checkpoint=run / 'last.pth.tar', rows=rows, log=records)


# ---- a checkpoint carries what it was trained with ------------------------------------------------------------

def test_train_records_size_classes_and_data_in_its_checkpoints(trained):
    state = torch.load(trained['checkpoint'], map_location='cpu', weights_only=True)
    cfg = state['pretrained_cfg']
    assert tuple(cfg['input_size']) == (3, 64, 64) and cfg['crop_pct'] == 0.875 and cfg['interpolation'] == 'bicubic'
    assert tuple(cfg['mean']) == timm.data.IMAGENET_DEFAULT_MEAN and cfg['label_names'] == list(CLASSES)
    assert state['model_args'] == {'img_size': 64} and state['dataset'] == 'image folder pets'
    from flatten_timm.hub import load_checkpoint_config
    config = load_checkpoint_config(trained['checkpoint'])
    assert config['architecture'] == 'flatten_pvt_v2_b0' and config['model_args'] == {'img_size': 64}


def test_validate_evaluates_a_checkpoint_at_the_size_it_was_trained_at(trained, tmp_path):
    validate = _load_script('validate')
    results = tmp_path / 'val.json'
    assert validate.main(['--data-dir', str(trained['data']), '--model', 'flatten_pvt_v2_b0', '--checkpoint',
                          str(trained['checkpoint']), '--workers', '0', '--results-file', str(results)]) == 0
    summary = json.loads(results.read_text())
    assert summary['img_size'] == 64 and summary['images'] == 4
    # the training run's own evaluation of these weights, on the same images with the same transform
    assert summary['loss'] == pytest.approx(trained['rows'][-1]['eval_loss'], abs=1e-3)


def test_predict_uses_the_checkpoints_size_and_class_names(trained, capsys):
    image = trained['data'] / 'val' / 'dog' / '0.png'
    assert main(['predict', '--model', 'flatten_pvt_v2_b0', '--checkpoint', str(trained['checkpoint']),
                 str(image)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == str(image) and sorted(line.split('%')[1].strip() for line in lines[1:]) == list(CLASSES)
    from flatten_timm.hub import create_model_as_trained
    model = create_model_as_trained('flatten_pvt_v2_b0', trained['checkpoint'])
    assert timm.data.resolve_data_config({}, model=model)['input_size'] == (3, 64, 64)

    def shapes(m):
        return {k: tuple(v.shape) for k, v in m.state_dict().items()}
    # built at 64 px (its positional encodings at the 64 px grid), not at 224 with the checkpoint's resized
    assert shapes(model) == shapes(timm.create_model('flatten_pvt_v2_b0', img_size=64, num_classes=2))
    assert shapes(model) != shapes(timm.create_model('flatten_pvt_v2_b0', num_classes=2))
    # an explicit size still wins
    model = create_model_as_trained('flatten_pvt_v2_b0', trained['checkpoint'], img_size=96)
    assert timm.data.resolve_data_config({}, model=model)['input_size'] == (3, 96, 96)


def test_convert_writes_an_honest_card_and_config(trained, tmp_path, capsys):
    out = tmp_path / 'hub'
    assert main(['convert', '--model', 'flatten_pvt_v2_b0', '--checkpoint', str(trained['checkpoint']),
                 '--output', str(out)]) == 0
    config = json.loads((out / 'config.json').read_text())
    assert config['pretrained_cfg']['input_size'] == [3, 64, 64] and config['model_args']['img_size'] == [64, 64]
    assert config['pretrained_cfg']['label_names'] == list(CLASSES) and 'tag' not in config['pretrained_cfg']
    card = (out / 'README.md').read_text()
    assert 'Image size:** 64 x 64' in card and 'Classes:** 2' in card and 'image folder pets' in card
    assert 'imagenet-1k' not in card.lower().split('## usage')[0].replace('imagenet-1k top-1:** not reported', '')
    # the converted folder's weights, predicted with the config beside them
    capsys.readouterr()
    image = trained['data'] / 'val' / 'cat' / '0.png'
    assert main(['predict', '--model', 'flatten_pvt_v2_b0', '--checkpoint', str(out / 'model.safetensors'),
                 str(image)]) == 0
    assert {line.split('%')[1].strip() for line in capsys.readouterr().out.strip().splitlines()[1:]} == set(CLASSES)


def test_export_uses_the_checkpoints_size(trained, tmp_path, capsys):
    pytest.importorskip('onnxruntime')
    assert main(['export', '--model', 'flatten_pvt_v2_b0', '--checkpoint', str(trained['checkpoint']),
                 '--output', str(tmp_path / 'm.onnx')]) == 0
    captured = capsys.readouterr()
    assert 'fixed size 1x3x64x64' in captured.out and '(outputs 1x2)' in captured.out
    assert 'exporting the flatten_pvt_v2_b0 classifier at 64x64' in captured.err  # progress, on stderr


# ---- the run's own report -----------------------------------------------------------------------------------

def test_train_says_how_many_epochs_and_why(trained):
    start = next(line for line in trained['log'] if 'process(es) on' in line)
    assert '1 epoch + 1 cool-down (--cooldown-epochs) = 2 epochs' in start and '64x64 px' in start
    assert [row['epoch'] for row in trained['rows']] == [0, 1]
    done = trained['log'][-1]
    assert done.startswith('done:') and 'rank' not in done  # the ranks' agreement is news only with several


def test_train_help_shows_defaults_and_the_epochs_a_config_adds():
    train = _load_script('train')
    text = train.build_parser().format_help()
    assert '(default: 300)' in text and '(default: adamw)' in text
    args = train.parse_args(['--config', str(REPO / 'configs' / 'flatten_pvt_v2_b0.yaml'), '--epochs', '1'])
    assert train.describe_epochs(args, args.epochs + args.cooldown_epochs) == \
        '1 epoch + 10 cool-down (--cooldown-epochs) = 11 epochs'


def test_config_values_show_in_help(capsys):
    train = _load_script('train')
    with pytest.raises(SystemExit):
        train.parse_args(['--config', str(REPO / 'configs' / 'flatten_pvt_v2_b0.yaml'), '--help'])
    text = capsys.readouterr().out
    assert re.search(r'--cooldown-epochs COOLDOWN_EPOCHS\s.*?\(default: 10\)', text, re.S)


def test_data_workers_default_to_the_cpus_there_are(monkeypatch):
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1}, raising=False)
    for script in ('train', 'validate'):
        parser = _load_script(script).build_parser()
        assert parser.get_default('workers') == 2, script
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(64)), raising=False)
    assert _load_script('train').build_parser().get_default('workers') == 4


# ---- pretrained weights without a network ---------------------------------------------------------------------

@pytest.fixture
def offline(monkeypatch):
    import timm.models._builder as builder

    def no_network(*args, **kwargs):
        raise urllib.error.URLError(OSError(-2, 'Name or service not known'))
    monkeypatch.setattr(builder, 'download_cached_file', no_network)


@pytest.mark.parametrize('kwargs', [{}, {'features_only': True, 'out_indices': (1, 2, 3)}],
                         ids=['classifier', 'features_only'])
def test_offline_pretrained_is_one_readable_error(offline, kwargs):
    with pytest.raises(urllib.error.URLError) as raised:  # code catching the download's own error still does
        timm.create_model('flatten_pvt_v2_b0', pretrained=True, **kwargs)
    message = str(raised.value)
    assert 'flatten_pvt_v2_b0.in1k' in message and 'https://cloud.tsinghua.edu.cn/' in message
    assert "pretrained_cfg_overlay=dict(file='flatten_pvt_v2_b0.pth')" in message and 'HF_HUB_OFFLINE' in message
    assert 'Name or service not known' in message  # the cause, in the one message
    assert raised.value.__cause__ is None and raised.value.__suppress_context__  # not a chain of tracebacks


def test_offline_hub_weights_name_the_hub_repository(monkeypatch):
    import timm.models._builder as builder
    from huggingface_hub.errors import LocalEntryNotFoundError

    def not_cached(*args, **kwargs):
        raise LocalEntryNotFoundError('cannot find the requested files in the local cache')
    monkeypatch.setattr(builder, 'load_state_dict_from_hf', not_cached)
    with pytest.raises(OSError, match=r'flatten_pvt_v2_b0\.in1k from the Hugging Face Hub \(me/b0\).*HF_HUB_OFFLINE'):
        timm.create_model('flatten_pvt_v2_b0', pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id='me/b0'))


def test_offline_pretrained_in_train_py_is_a_clear_exit(offline, trained, tmp_path):
    train = _load_script('train')
    with pytest.raises(SystemExit, match=r'flatten_pvt_v2_b0\.in1k from https://.*--initial-checkpoint FILE'):
        train.main(['--data-dir', str(trained['data']), '--model', 'flatten_pvt_v2_b0', '--pretrained',
                    '--workers', '0', '--output', str(tmp_path)])


def test_a_missing_local_file_is_not_called_a_download_failure():
    with pytest.raises(FileNotFoundError, match='not-here.pth'):
        timm.create_model('flatten_pvt_v2_b0', pretrained=True, pretrained_cfg_overlay=dict(file='not-here.pth'))


# ---- the model table ------------------------------------------------------------------------------------------

def test_models_reads_the_counted_table(monkeypatch, capsys):
    monkeypatch.setattr(timm, 'create_model', lambda name, **kwargs: pytest.fail(f'{name} built to be counted'))
    start = time.perf_counter()
    assert main(['models']) == 0
    assert time.perf_counter() - start < 1.0
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if line.startswith('flatten_')]) == 21


def test_model_table_covers_every_model_and_matches_the_code():
    from flatten_timm.zoo import count_model, list_flatten_models, load_zoo_table
    table = load_zoo_table()
    assert sorted(table) == sorted(list_flatten_models()), 'regenerate: python -m flatten_timm.zoo --write'
    for name in ('flatten_pvt_v2_b0', 'flatten_swin_tiny_patch4_224', 'flatten_cswin_tiny_224'):
        counted, stored = count_model(name), table[name]
        assert stored.img_size == counted.img_size, name
        stale = f'{name}: python -m flatten_timm.zoo --write'
        assert stored.params_m == pytest.approx(counted.params_m, abs=1e-6), stale
        assert stored.gmacs == pytest.approx(counted.gmacs, abs=1e-6), stale


@pytest.mark.parametrize('pattern, expected', [
    ('swin_base', ['flatten_swin_base_patch4_224', 'flatten_swin_base_patch4_384']),
    ('*swin_base*', ['flatten_cswin_base_224', 'flatten_cswin_base_384', 'flatten_swin_base_patch4_224',
                     'flatten_swin_base_patch4_384']),
    ('swin_*_384', ['flatten_swin_base_patch4_384']),
    ('flatten_pvt_v2_b[01]', ['flatten_pvt_v2_b0', 'flatten_pvt_v2_b1']),
])
def test_models_filter_matches_as_timm_does(pattern, expected, capsys):
    assert main(['models', '--filter', pattern]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:]] == expected


# ---- long commands say what they do; small errors say what is wrong -----------------------------------------------

def test_bench_shows_what_it_measures(capsys):
    assert main(['bench', '--models', 'flatten_pvt_v2_b0', '--img-size', '64', '-b', '1', '--repeats', '1',
                 '--warmup', '1', '--device', 'cpu', '--no-peers']) == 0
    out, err = capsys.readouterr()
    assert '[1/1] flatten_pvt_v2_b0 at 64, infer, fp32, batch 1 on cpu' in err
    assert 'warming up flatten_pvt_v2_b0' in err and 'timing 1 batch of each' in err and 'img/s' in err
    assert 'peak memory: each model built again' in err  # by default, on a CPU too
    row = next(line for line in out.splitlines() if line.startswith('| flatten_pvt_v2_b0 '))
    assert float(row.split('|')[10]) > 13  # MiB: at least the 3.7 M weights


def test_bench_device_has_help():
    bench = build_parser()._subparsers._group_actions[0].choices['bench']
    device = next(a for a in bench._actions if '--device' in a.option_strings)
    assert device.help and 'cuda' in device.help and device.default is None  # chosen when the command runs


def test_exporter_warnings_are_quieted(monkeypatch, caplog, tmp_path):
    pytest.importorskip('onnx')
    from flatten_timm.export import ExportError, export_onnx

    def noisy_export(*args, **kwargs):  # what torch.onnx's dynamo exporter logs through onnxscript
        for _ in range(20):
            logging.getLogger('onnxscript.optimizer._constant_folding').warning(
                'Skipping constant folding for op Split with multiple outputs.')
        raise RuntimeError('stop here')
    monkeypatch.setattr(torch.onnx, 'export', noisy_export)
    model = timm.create_model('flatten_pvt_v2_b0', img_size=64)
    with caplog.at_level(logging.WARNING), pytest.raises(ExportError, match='stop here'):
        export_onnx(model, tmp_path / 'm.onnx', (64, 64))
    assert not [r for r in caplog.records if 'constant folding' in r.getMessage()]
    assert logging.getLogger('onnxscript').level == logging.NOTSET  # restored


def test_predict_a_missing_image_says_it_does_not_exist(tmp_path):
    with pytest.raises(SystemExit, match='missing.jpg: no such file'):
        main(['predict', '--model', 'flatten_pvt_v2_b0', str(tmp_path / 'missing.jpg')])


# ---- the README's getting-started path ------------------------------------------------------------------------

def _readme() -> str:
    return (REPO / 'README.md').read_text(encoding='utf-8')


def test_readme_quick_start_has_two_commands_and_says_where_the_cli_is():
    quick_start = _readme().split('## Quick start', 1)[1].split('\n## ', 1)[0]
    block = quick_start.split('```bash', 1)[1].split('```', 1)[0]
    assert [line.split('#')[0].strip() for line in block.strip().splitlines()] == ['make run', 'make test']
    assert '.venv/bin/flatten-timm' in quick_start and 'source .venv/bin/activate' in quick_start


def test_readme_commands_leave_committed_files_alone():
    readme = _readme()
    listed = subprocess.run(['git', '-C', str(REPO), 'ls-files'], capture_output=True, text=True)
    committed = set(listed.stdout.splitlines())
    for match in re.finditer(r'--output[ =](\S+)', readme):
        assert match.group(1) not in committed, f'a README command overwrites the committed {match.group(1)}'
    assert '../shared' not in readme and 'the spec' not in readme and "spec's" not in readme
