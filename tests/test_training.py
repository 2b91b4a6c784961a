""" scripts/train.py and scripts/validate.py on a tiny generated image folder; configs/ recipes."""
import csv
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TRAIN, VALIDATE = REPO / 'scripts' / 'train.py', REPO / 'scripts' / 'validate.py'
# the smallest registered model at 64 px; 3 colour classes it can learn in a few steps
TINY_RUN = ['--model', 'flatten_pvt_v2_b0', '--img-size', '64', '-b', '8', '--workers', '0', '--warmup-epochs', '0',
            '--lr', '0.02', '--smoothing', '0', '--log-interval', '100', '--seed', '3']


def _load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem + '_script', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp('images')
    rng = np.random.default_rng(0)
    colours = [(220, 40, 40), (40, 200, 40), (40, 40, 220)]
    for split, count in (('train', 8), ('val', 3)):
        for c, colour in enumerate(colours):
            folder = root / split / f'class{c}'
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.array(colour)[None, None] * rng.uniform(0.6, 1.0) + rng.normal(0, 25, (48, 48, 3))
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f'{i}.png')
    return root


def _run(script, *args, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600, **kwargs)


def _weights(path):
    return torch.load(path, map_location='cpu', weights_only=True)['model']


def test_two_epochs_learn_and_validate(image_folder, tmp_path):
    result = _run(TRAIN, '--data-dir', image_folder, '--epochs', 2, '--output', tmp_path, '--experiment', 'run',
                  *TINY_RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / 'run'
    rows = list(csv.DictReader(open(run / 'summary.csv')))
    assert [int(r['epoch']) for r in rows] == [0, 1]
    assert float(rows[1]['train_loss']) < float(rows[0]['train_loss'])
    assert {'eval_top1', 'eval_top5', 'eval_loss'} <= set(rows[0])
    assert (run / 'last.pth.tar').is_file() and (run / 'model_best.pth.tar').is_file()
    assert (run / 'summary.jsonl').read_text().count('\n') == 2
    assert 'ETA' in result.stderr

    result = _run(VALIDATE, '--data-dir', image_folder, '--model', 'flatten_pvt_v2_b0', '--img-size', 64,
                  '--checkpoint', run / 'last.pth.tar', '--workers', 0, '--results-file', tmp_path / 'val.json')
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'top-1' in result.stdout and 'top-5' in result.stdout and '(9 images)' in result.stdout
    import json
    summary = json.loads((tmp_path / 'val.json').read_text())
    assert summary['images'] == 9 and summary['crop_pct'] == 0.875 and summary['interpolation'] == 'bicubic'
    assert summary['loss'] == pytest.approx(float(rows[1]['eval_loss']), abs=1e-3)


def test_killed_and_resumed_run_ends_with_the_same_weights(image_folder, tmp_path):
    args = ['--data-dir', image_folder, '--epochs', 3, '--model-ema', '--model-ema-decay', '0.9', '--mixup', '0.8',
            '--cutmix', '1.0', '--aa', 'rand-m9-mstd0.5-inc1', '--reprob', '0.25', '--drop-path', '0.1',
            '--clip-grad', '1.0', *TINY_RUN]
    straight = _run(TRAIN, *args, '--output', tmp_path, '--experiment', 'straight')
    assert straight.returncode == 0, straight.stderr[-3000:]

    last = tmp_path / 'killed' / 'last.pth.tar'
    process = subprocess.Popen([sys.executable, str(TRAIN), *map(str, args), '--output', str(tmp_path),
                                '--experiment', 'killed'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=dict(os.environ, OMP_NUM_THREADS='1'))
    deadline = time.time() + 300
    while not last.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, 'the run finished before it could be killed'
    stopped_at = torch.load(last, weights_only=True)['epoch']
    assert stopped_at < 2

    resumed = _run(TRAIN, *args, '--output', tmp_path, '--experiment', 'killed', '--resume', last)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f'continuing at epoch {stopped_at + 1}' in resumed.stderr
    a, b = torch.load(tmp_path / 'straight' / 'last.pth.tar', weights_only=True), torch.load(last, weights_only=True)
    assert a['epoch'] == b['epoch'] == 2
    for key in ('model', 'model_ema'):
        for name, tensor in a[key].items():
            torch.testing.assert_close(b[key][name], tensor, rtol=0, atol=0, msg=f'{key}.{name}')
    assert a['optimizer']['state'].keys() == b['optimizer']['state'].keys()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_on_cpu(image_folder, tmp_path):
    result = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={_free_port()}',
         str(TRAIN), '--data-dir', str(image_folder), '--epochs', '1', '--output', str(tmp_path),
         '--grad-accum-steps', '2', *TINY_RUN[:4], '-b', '4', *TINY_RUN[6:]],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert result.returncode == 0, result.stderr[-3000:]
    assert '2 process(es) on cpu, global batch 8' in result.stderr
    assert '2 rank(s) hold the same weights' in result.stderr


@pytest.mark.parametrize('config', sorted((REPO / 'configs').glob('*.yaml')), ids=lambda p: p.stem)
def test_every_config_builds_its_model_and_optimizer(config):
    train = _load_script(TRAIN)
    args = train.parse_args(['--config', str(config), '--data-dir', '/nonexistent'])
    assert args.model == config.stem and args.config_metadata['paper_global_batch'] == args.batch_size * 8
    with torch.device('meta'):
        model = train.build_model(args, num_classes=1000)
    assert model.pretrained_cfg['input_size'][-1] in (224, 384) and model.patch_embed is not None
    optimizer, scheduler, num_epochs = train.build_optimizer_and_scheduler(args, model, world_size=8,
                                                                          updates_per_epoch=10)
    assert num_epochs == args.epochs + args.cooldown_epochs
    # the paper's global batch on 8 GPUs: lr = base lr * global / 512
    assert optimizer.param_groups[0]['initial_lr'] == pytest.approx(args.lr * args.batch_size * 8 / 512)


def test_bad_arguments_fail_before_any_data_is_read(image_folder, monkeypatch, tmp_path):
    train = _load_script(TRAIN)
    monkeypatch.setattr(train, 'create_dataset', lambda *a, **k: pytest.fail('data was read'))
    cases = [
        (['--model', 'flatten_nope'], "unknown model 'flatten_nope'"),
        (['--data-dir', str(image_folder / 'missing')], 'training folder'),
        (['-b', '6', '--grad-accum-steps', '4'], 'not divisible by --grad-accum-steps'),
        (['--resume', 'nothing.pth.tar'], '--resume nothing.pth.tar: no such file'),
    ]
    for extra, message in cases:
        argv = ['--data-dir', str(image_folder), '--model', 'flatten_pvt_v2_b0', *extra]
        with pytest.raises(SystemExit, match=message):
            train.main(argv)
    with pytest.raises(SystemExit):
        train.parse_args(['--config', str(REPO / 'configs' / 'flatten_pvt_tiny.yaml'), '--no-such-flag'])
    (tmp_path / 'typo.yaml').write_text('model: flatten_pvt_tiny\nbatchsize: 64\n')
    with pytest.raises(SystemExit):
        train.parse_args(['--config', str(tmp_path / 'typo.yaml')])


def test_aa_none_switches_randaugment_off(image_folder, monkeypatch, tmp_path):
    train = _load_script(TRAIN)
    recipe = str(REPO / 'configs' / 'flatten_pvt_v2_b0.yaml')  # sets RandAugment
    assert train.parse_args(['--config', recipe]).aa.startswith('rand-')
    for off in ('none', 'None', ''):
        assert train.parse_args(['--config', recipe, '--aa', off]).aa is None
    (tmp_path / 'no_aa.yaml').write_text('model: flatten_pvt_v2_b0\naa: none\n')
    assert train.parse_args(['--config', str(tmp_path / 'no_aa.yaml')]).aa is None

    class Built(Exception):
        pass

    def capture_loader(dataset, **kwargs):  # the training loader's transform, then stop
        raise Built(kwargs['auto_augment'])

    monkeypatch.setattr(train, 'create_loader', capture_loader)
    with pytest.raises(Built) as built:
        train.main(['--config', recipe, '--aa', 'none', '--data-dir', str(image_folder), *TINY_RUN,
                    '--output', str(tmp_path)])
    assert built.value.args == (None,)
    # and timm builds the training transform without any auto-augmentation op
    from timm.data import create_transform
    transform = create_transform(64, is_training=True, auto_augment=None)
    assert not any('RandAugment' in type(t).__name__ for t in transform.transforms)
