""" Reading checkpoint files without golden outputs: no code from a pickle runs, bad files fail clearly, the
state dict is found under the keys training scripts use, wrapper prefixes are stripped, mismatches are summarised."""
import builtins
import os
import pickle
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

from flatten_timm.checkpoint import CheckpointError, load_checkpoint_file, load_weights_into
from test_models import tiny

MODEL = 'flatten_pvt_v2_b0'


def _state_dict(offset: float = 0.):
    """The weights of a tiny model; `offset` makes them differ from any freshly built model's."""
    return {k: v + offset if v.is_floating_point() else v for k, v in tiny(MODEL).state_dict().items()}


def _fake_yacs_config():
    """An object of a class that exists only while it is pickled, like the yacs CfgNode of the official runs."""
    module = types.ModuleType('fake_yacs_config')

    class CfgNode(dict):
        pass
    CfgNode.__module__ = module.__name__
    CfgNode.__qualname__ = 'CfgNode'
    module.CfgNode = CfgNode
    sys.modules[module.__name__] = module
    cfg = CfgNode(MODEL=CfgNode(TYPE='flatten_pvt_tiny'), TRAIN=CfgNode(EPOCHS=300))
    return cfg, lambda: sys.modules.pop(module.__name__)


def official_training_checkpoint(path, state_dict, **extra):
    """A file laid out as the official training code writes it: weights, optimizer, scheduler, a yacs config."""
    cfg, forget_class = _fake_yacs_config()
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    torch.save({'model': state_dict, 'optimizer': optimizer.state_dict(), 'lr_scheduler': {'last_epoch': 299},
                'epoch': 299, 'max_accuracy': 77.8, 'config': cfg, **extra}, path)
    forget_class()  # the class does not exist where the file is loaded


def _assert_same_tensors(got, expected):
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


def test_official_training_checkpoint_gives_its_model_entry(tmp_path):
    state_dict = _state_dict(0.5)
    path = tmp_path / 'official.pth'
    official_training_checkpoint(path, state_dict)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # why a safe loader is needed at all
    _assert_same_tensors(load_checkpoint_file(path), state_dict)
    model = tiny(MODEL)
    model.load_pretrained(str(path))
    _assert_same_tensors(model.state_dict(), state_dict)


class _Payload:
    """Unpickling this calls `function(*args)`: what a hostile checkpoint would do."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize('payload', ['os.system', 'builtins.exec'])
def test_code_in_a_checkpoint_never_runs(tmp_path, payload):
    marker = tmp_path / 'pwned'
    if payload == 'os.system':
        hostile = _Payload(os.system, f'touch {marker}')
    else:
        hostile = _Payload(builtins.exec, f'open({str(marker)!r}, "w").close()')
    with open(tmp_path / 'control.pkl', 'wb') as f:  # the payload runs when an ordinary unpickler reads it
        pickle.dump(hostile, f)
    with open(tmp_path / 'control.pkl', 'rb') as f:
        pickle.load(f)
    assert marker.exists()
    marker.unlink()

    state_dict = _state_dict(0.5)
    path = tmp_path / 'evil.pth'
    torch.save({'model': state_dict, 'extra': hostile, 'nested': {'deeper': [hostile]}}, path)
    model = tiny(MODEL)
    model.load_pretrained(str(path))
    assert not marker.exists()
    _assert_same_tensors(model.state_dict(), state_dict)

    # the payload as the state dict itself: nothing runs, and the file is refused
    torch.save(hostile, path)
    with pytest.raises(CheckpointError, match='contains no tensors'):
        load_checkpoint_file(path)
    assert not marker.exists()


def test_truncated_and_foreign_files_fail_clearly(tmp_path):
    path = tmp_path / 'full.pth'
    torch.save({'model': _state_dict()}, path)
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match='truncated or corrupt'):
        load_checkpoint_file(truncated)

    text = tmp_path / 'notes.pth'
    text.write_text('these are not weights')
    with pytest.raises(CheckpointError, match='not a readable PyTorch checkpoint'):
        load_checkpoint_file(text)

    bad_safetensors = tmp_path / 'broken.safetensors'
    bad_safetensors.write_bytes(b'\x00' * 64)
    with pytest.raises(CheckpointError, match='not a valid safetensors file'):
        load_checkpoint_file(bad_safetensors)

    with pytest.raises(FileNotFoundError, match='checkpoint file not found'):
        load_checkpoint_file(tmp_path / 'missing.pth')

    torch.save({'epoch': 3, 'note': 'no weights'}, tmp_path / 'empty.pth')
    with pytest.raises(CheckpointError, match='contains no tensors'):
        load_checkpoint_file(tmp_path / 'empty.pth')


def test_ema_weights_can_be_chosen(tmp_path):
    state_dict, ema = _state_dict(), _state_dict(1.)
    path = tmp_path / 'ema.pth'
    official_training_checkpoint(path, state_dict, model_ema=ema)
    _assert_same_tensors(load_checkpoint_file(path), state_dict)
    _assert_same_tensors(load_checkpoint_file(path, key='model_ema'), ema)
    with pytest.raises(CheckpointError, match=r"no state dict under 'state_dict_ema'; it has \['model', 'model_ema'\]"):
        load_checkpoint_file(path, key='state_dict_ema')


@pytest.mark.parametrize('key', ['model_ema', 'state_dict_ema', 'state_dict'])
def test_the_only_state_dict_of_a_checkpoint_is_found(tmp_path, key):
    """A checkpoint with EMA weights only (or timm's 'state_dict') loads them; this script's files keep None
    where they have no EMA, which is skipped."""
    weights = _state_dict(1.)
    path = tmp_path / 'only.pth'
    torch.save({key: weights, 'model': None, 'epoch': 7, 'optimizer': {'state': {}}}, path)
    _assert_same_tensors(load_checkpoint_file(path), weights)
    model = tiny(MODEL)
    model.load_pretrained(str(path))
    _assert_same_tensors(model.state_dict(), weights)


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_a_data_parallel_prefix_is_stripped(tmp_path, suffix):
    """Weights saved from a DataParallel / DDP wrapper carry 'module.' before every key."""
    model = tiny(MODEL)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.)
    wrapped = torch.nn.DataParallel(model)  # its state dict is the DDP one: 'module.' + key
    saved = {k: v.clone() for k, v in wrapped.state_dict().items()}
    assert saved and all(k.startswith('module.') for k in saved)
    path = tmp_path / f'ddp{suffix}'
    if suffix == '.safetensors':
        save_file(saved, str(path))
    else:
        torch.save({'model': saved, 'epoch': 1}, path)
    _assert_same_tensors(load_checkpoint_file(path), model.state_dict())
    fresh = tiny(MODEL)
    fresh.load_pretrained(str(path))
    _assert_same_tensors(fresh.state_dict(), model.state_dict())


def test_shape_mismatches_are_listed_and_nothing_is_loaded():
    model = tiny(MODEL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state_dict = _state_dict(1.)
    wrong = ['stages.1.blocks.0.mlp.fc1.weight', 'patch_embed.proj.weight']
    for k in wrong:
        state_dict[k] = torch.zeros(state_dict[k].shape[0] + 1, *state_dict[k].shape[1:])
    with pytest.raises(CheckpointError) as err:
        load_weights_into(model, state_dict)
    message = str(err.value)
    assert message.startswith(f'checkpoint does not fit {MODEL}: shape mismatches: 2 '
                              '(patch_embed.proj.weight, stages.1.blocks.0.mlp.fc1.weight).')
    assert 'missing keys' not in message and 'unexpected keys' not in message
    assert 'another architecture or variant' in message
    _assert_same_tensors(model.state_dict(), before)  # refused as a whole, not loaded in part

    # a variant of other widths: every mismatch counted, the first five (sorted) named
    other = tiny(MODEL, embed_dims=(8, 16, 24, 32), num_heads=(1, 2, 3, 4)).state_dict()
    target = model.state_dict()
    mismatched = sorted(k for k in other if k in target and other[k].shape != target[k].shape
                        and not k.startswith('head.'))
    with pytest.raises(CheckpointError) as err:
        load_weights_into(model, other)
    assert f'shape mismatches: {len(mismatched)} ({", ".join(mismatched[:5])}, ...)' in str(err.value)
    assert len(mismatched) > 5


def test_another_class_count_loads_with_the_head_left_as_built():
    model = tiny(MODEL, num_classes=4)
    head = {k: v.clone() for k, v in model.head.state_dict().items()}
    state_dict = _state_dict(1.)  # 1000 classes
    load_weights_into(model, state_dict)
    loaded = model.state_dict()
    for k, v in state_dict.items():
        if k.startswith('head.'):
            assert torch.equal(loaded[k], head[k[len('head.'):]])
        else:
            assert torch.equal(loaded[k], v), k
