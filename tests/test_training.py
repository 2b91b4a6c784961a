""" scripts/train.py and scripts/validate.py on a tiny generated image folder; configs/ recipes."""
import argparse
import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from conftest import load_script

REPO = Path(__file__).resolve().parents[1]
TRAIN, VALIDATE = REPO / 'scripts' / 'train.py', REPO / 'scripts' / 'validate.py'
# the smallest registered model at 64 px; 3 colour classes it can learn in a few steps
TINY_RUN = ['--model', 'flatten_pvt_v2_b0', '--img-size', '64', '-b', '8', '--workers', '0', '--warmup-epochs', '0',
            '--lr', '0.02', '--smoothing', '0', '--log-interval', '100', '--seed', '3']


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
    train = load_script(TRAIN)
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
    train = load_script(TRAIN)
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
    train = load_script(TRAIN)
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


@pytest.fixture
def tiny_models(monkeypatch):
    """train.py run in this process builds the narrow test configuration of its model (tests/test_models.py TINY):
    what these tests check is the script's loop, which runs the same on any width. On one thread, as the runs
    in a subprocess (a team of threads stalls on a machine busy with other work)."""
    from test_models import TINY
    create_model = timm.create_model
    monkeypatch.setattr(timm, 'create_model', lambda name, **kwargs: create_model(name, **{**TINY[name], **kwargs}))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _assert_same(a, b, what):
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=what)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            _assert_same(a[k], b[k], f'{what}.{k}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f'{what}[{i}]')
    else:
        assert a == b, (what, a, b)


def test_amp_run_resumed_continues_bit_identically(image_folder, tmp_path, monkeypatch, tiny_models):
    """--amp (float16): a run resumed from its epoch-0 checkpoint (what a run killed after epoch 0 leaves) ends
    exactly as the run that went on, its loss scaler's state (the scale, the steps since that last changed) saved
    with every epoch and restored.

    train.py refuses float16 without a GPU: its channels-last convs take up to a second a call on a CPU. The
    scaler is the same whatever autocast computes in, so on a CPU the test lifts that one refusal and lets the
    run's autocast compute in bfloat16 (what --amp-dtype bfloat16 runs, without a scaler)."""
    train = load_script(TRAIN)
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device == 'cpu':
        check_args, autocast = train.check_args, torch.autocast
        monkeypatch.setattr(train, 'check_args',
                            lambda args: check_args(argparse.Namespace(**{**vars(args), 'amp': False})))
        monkeypatch.setattr(torch, 'autocast', lambda device_type, dtype=None, **kwargs: autocast(
            device_type, dtype=torch.bfloat16 if dtype == torch.float16 else dtype, **kwargs))
    epoch0 = tmp_path / 'epoch0.pth.tar'
    save = train.save_atomically

    def save_and_keep_epoch_0(state, path):
        save(state, path)
        if state['epoch'] == 0 and path.endswith('last.pth.tar'):
            shutil.copy(path, epoch0)

    monkeypatch.setattr(train, 'save_atomically', save_and_keep_epoch_0)
    args = ['--data-dir', str(image_folder), '--epochs', '2', '--amp', '--amp-dtype', 'float16', '--device', device,
            '--val-split', '', '--output', str(tmp_path), *TINY_RUN, '-b', '12']  # 24 images: two steps an epoch
    train.main(args + ['--experiment', 'straight'])
    stopped = torch.load(epoch0, weights_only=True)
    assert stopped['epoch'] == 0 and stopped['scaler']['_growth_tracker'] == 2  # two steps: a state to lose
    train.main(args + ['--experiment', 'resumed', '--resume', str(epoch0)])

    a, b = (torch.load(tmp_path / run / 'last.pth.tar', weights_only=True) for run in ('straight', 'resumed'))
    assert a['epoch'] == b['epoch'] == 1
    for key in ('model', 'optimizer', 'scheduler', 'scaler'):
        _assert_same(a[key], b[key], key)


def _recording_starts(train, monkeypatch) -> list:
    """(epoch, weights, optimizer state entries, lr) where each training epoch starts."""
    started, train_one_epoch = [], train.train_one_epoch

    def record_start(epoch, model, loader, optimizer, *args, **kwargs):
        started.append((epoch, {k: v.clone() for k, v in model.state_dict().items()}, len(optimizer.state),
                        optimizer.param_groups[0]['lr']))
        return train_one_epoch(epoch, model, loader, optimizer, *args, **kwargs)

    monkeypatch.setattr(train, 'train_one_epoch', record_start)
    return started


def test_accumulated_micro_batches_equal_one_batch(image_folder, tmp_path, monkeypatch, tiny_models):
    """--grad-accum-steps 2 with -b 8 (two micro-batches of 4 per step) takes the steps one batch of 8 takes, up
    to float rounding: the same images in the same order, the loss averaged over all 8. SGD (an update linear in
    the gradient) and no drop path, so that nothing but the accumulation differs."""
    train = load_script(TRAIN)
    started = _recording_starts(train, monkeypatch)
    args = ['--data-dir', str(image_folder), '--epochs', '1', '--opt', 'sgd', '--drop-path', '0', '--val-split', '',
            '--output', str(tmp_path), *TINY_RUN, '--lr', '1.0']
    updates = {}
    for steps in (1, 2):
        train.main(args + ['--grad-accum-steps', str(steps), '--experiment', f'accum{steps}'])
        initial = started[-1][1]
        weights = torch.load(tmp_path / f'accum{steps}' / 'last.pth.tar', weights_only=True)['model']
        updates[steps] = torch.cat([(weights[k] - initial[k]).flatten() for k in sorted(initial)
                                    if initial[k].is_floating_point()])
    _assert_same(started[0][1], started[1][1], 'initial weights')
    one, accumulated = updates[1], updates[2]
    assert one.abs().max() > 1e-2  # the steps did move the weights
    # 4e-7 here; summing the loss of the micro-batches instead of averaging it gives 0.6, zeroing the gradients
    # before each micro-batch 0.4
    error = float((accumulated - one).norm() / one.norm())
    assert error < 1e-4, error


def test_initial_checkpoint_starts_a_fresh_run_from_its_weights(image_folder, tmp_path, monkeypatch, tiny_models):
    """--initial-checkpoint loads the weights of a checkpoint (of this script here) and nothing else: training
    starts at epoch 0 with a fresh optimizer and the warm-up of the schedule, not where that run stopped."""
    train = load_script(TRAIN)
    args = ['--data-dir', str(image_folder), '--epochs', '1', '--val-split', '', '--output', str(tmp_path), *TINY_RUN]
    model = train.build_model(train.parse_args(args), num_classes=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    # a checkpoint as this script writes it, of a run that went on for 42 epochs
    optimizer, scheduler, _ = train.build_optimizer_and_scheduler(train.parse_args(args + ['--epochs', '50']), model,
                                                                  world_size=1, updates_per_epoch=3)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    optimizer.step()
    scheduler.step(42)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoint = tmp_path / 'earlier.pth.tar'
    torch.save({'model': weights, 'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
                'scaler': None, 'model_ema': None, 'epoch': 41, 'best': 99.0}, checkpoint)

    started = _recording_starts(train, monkeypatch)
    train.main(args + ['--warmup-epochs', '1', '--warmup-lr', '1e-4', '--initial-checkpoint', str(checkpoint),
                       '--experiment', 'fine_tune'])
    assert [epoch for epoch, *_ in started] == [0]  # one epoch, the first: not where the earlier run stopped
    ((_, start_weights, optimizer_state, lr),) = started
    assert optimizer_state == 0
    assert lr == pytest.approx(1e-4 * 8 / 512)  # the warm-up's first learning rate, scaled to the batch
    _assert_same(weights, start_weights, 'model')
    rows = list(csv.DictReader(open(tmp_path / 'fine_tune' / 'summary.csv')))
    assert [int(r['epoch']) for r in rows] == [0]
