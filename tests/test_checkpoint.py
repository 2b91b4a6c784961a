""" Official training checkpoints load safely; bad files fail with messages that name the problem."""
import os
import pickle
import sys
import types

import pytest
import timm
import torch

from conftest import PARITY_CASES, model_kwargs_for, official_state_dict, parity_case
from flatten_timm.checkpoint import CheckpointError, load_checkpoint_file
from flatten_timm.models import flatten_pvt

pytestmark = pytest.mark.skipif(not PARITY_CASES, reason='parity fixtures (tests/fixtures/parity) are absent')


def _pvt_case():
    meta, tensors = parity_case('pvt_released_layout')
    return model_kwargs_for(meta), official_state_dict(tensors), tensors


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


def _official_training_checkpoint(path, state_dict, **extra):
    cfg, forget_class = _fake_yacs_config()
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    torch.save({'model': state_dict, 'optimizer': optimizer.state_dict(), 'lr_scheduler': {'last_epoch': 299},
                'epoch': 299, 'max_accuracy': 77.8, 'config': cfg, **extra}, path)
    forget_class()  # the class does not exist where the file is loaded


def _model(kwargs):
    return timm.create_model('flatten_pvt_tiny', **kwargs).eval()


def test_official_training_checkpoint_loads_like_the_bare_state_dict(tmp_path):
    kwargs, state_dict, tensors = _pvt_case()
    path = tmp_path / 'flatten_pvt_t.pth'
    _official_training_checkpoint(path, state_dict)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # why a safe loader is needed at all

    model = timm.create_model('flatten_pvt_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              **kwargs).eval()
    reference = _model(kwargs)
    reference.load_pretrained(str(path))
    bare = _model(kwargs)
    bare.load_state_dict(flatten_pvt.checkpoint_filter_fn(state_dict, bare))
    x = tensors['input']
    with torch.no_grad():
        torch.testing.assert_close(model(x), bare(x), rtol=0, atol=0)
        torch.testing.assert_close(reference(x), tensors['logits'], atol=1e-4, rtol=0)


def test_ema_weights_can_be_chosen(tmp_path):
    kwargs, state_dict, _ = _pvt_case()
    ema = {k: v + 1 for k, v in state_dict.items()}
    path = tmp_path / 'ema.pth'
    _official_training_checkpoint(path, state_dict, model_ema=ema)
    assert torch.equal(load_checkpoint_file(path)['head.bias'], state_dict['head.bias'])
    assert torch.equal(load_checkpoint_file(path, key='model_ema')['head.bias'], ema['head.bias'])
    with pytest.raises(CheckpointError, match="no state dict under 'state_dict_ema'"):
        load_checkpoint_file(path, key='state_dict_ema')


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_code_in_a_checkpoint_never_runs(tmp_path):
    kwargs, state_dict, tensors = _pvt_case()
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    torch.save({'model': state_dict, 'extra': _Payload(marker)}, path)
    model = _model(kwargs)
    model.load_pretrained(str(path))
    assert not marker.exists()
    with torch.no_grad():
        torch.testing.assert_close(model(tensors['input']), tensors['logits'], atol=1e-4, rtol=0)

    # the payload as the state dict itself: nothing runs, and the file is refused
    torch.save(_Payload(marker), path)
    with pytest.raises(CheckpointError, match='contains no tensors'):
        load_checkpoint_file(path)
    assert not marker.exists()


def test_truncated_and_foreign_files_fail_clearly(tmp_path):
    _, state_dict, _ = _pvt_case()
    path = tmp_path / 'full.pth'
    torch.save({'model': state_dict}, path)
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


def test_checkpoint_of_another_architecture_is_refused_with_a_summary(tmp_path):
    kwargs, _, _ = _pvt_case()
    _, swin_tensors = parity_case('swin_llss_224')
    path = tmp_path / 'swin.pth'
    torch.save({'model': official_state_dict(swin_tensors)}, path)
    model = _model(kwargs)
    with pytest.raises(CheckpointError) as err:
        model.load_pretrained(str(path))
    message = str(err.value)
    assert 'does not fit flatten_pvt_tiny' in message and 'missing keys' in message
    assert 'unexpected keys' in message and ', ...' in message and len(message) < 1500


def test_other_class_count_reinitialises_the_head(tmp_path):
    kwargs, state_dict, tensors = _pvt_case()
    path = tmp_path / 'official.pth'
    torch.save({'model': state_dict}, path)
    model = timm.create_model('flatten_pvt_tiny', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                              **dict(kwargs, num_classes=4)).eval()
    reference = _model(kwargs)
    reference.load_pretrained(str(path))
    x = tensors['input']
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), reference.forward_features(x), rtol=0, atol=0)
    assert model(x).shape == (2, 4)
