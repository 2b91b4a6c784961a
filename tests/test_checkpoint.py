""" Official checkpoints against the official golden outputs (tests/fixtures/parity): the training-checkpoint
layout, other architectures and class counts, other training resolutions. test_checkpoint_safety.py covers what
needs no golden outputs (hostile pickles, bad files, where the state dict is found)."""
import math
import pickle

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from scipy.optimize import brentq

from conftest import PARITY_CASES, model_kwargs_for, official_state_dict, parity_case
from flatten_timm.checkpoint import CheckpointError
from flatten_timm.models import flatten_cswin, flatten_pvt, flatten_swin
from test_checkpoint_safety import official_training_checkpoint

pytestmark = pytest.mark.skipif(not PARITY_CASES, reason='parity fixtures (tests/fixtures/parity) are absent')


def _pvt_case():
    meta, tensors = parity_case('pvt_released_layout')
    return model_kwargs_for(meta), official_state_dict(tensors), tensors


def _model(kwargs):
    return timm.create_model('flatten_pvt_tiny', **kwargs).eval()


def test_official_training_checkpoint_loads_like_the_bare_state_dict(tmp_path):
    kwargs, state_dict, tensors = _pvt_case()
    path = tmp_path / 'flatten_pvt_t.pth'
    official_training_checkpoint(path, state_dict)
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


def _bilinear_on_grid(table: torch.Tensor, side: int) -> torch.Tensor:
    """A (1, n*n, C) table of tokens in row-major grid order, resized bilinearly to side x side (corners not aligned,
    as torch.nn.functional.interpolate's default for a 2-D bilinear resize)."""
    n = math.isqrt(table.shape[1])
    grid = table.reshape(1, n, n, table.shape[2]).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(side, side), mode='bilinear', align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, side * side, table.shape[2])


def _geometric_offsets(src_largest: int, dst_largest: int) -> np.ndarray:
    """Where a table's offsets -m..m (m = src_largest) land on the offset axis of a larger window: BEiT's rule
    (what timm's resize_rel_pos_bias_table does), offset 1 stays at 1 and each further step is q times the last,
    with q such that offset m lands on dst_largest. Near offsets keep their trained bias, far ones spread out."""
    q = brentq(lambda q: sum(q ** i for i in range(src_largest)) - dst_largest, 1 + 1e-9, 4.)
    positive = np.cumsum([q ** i for i in range(src_largest)])
    return np.concatenate([-positive[::-1], [0.], positive])


def _resized_bias_table(table: torch.Tensor, side: int) -> torch.Tensor:
    """A ((2w-1)^2, heads) Swin relative position bias table resized to (side^2, heads): per head, the
    (2w-1) x (2w-1) grid of (dy, dx) offsets placed at _geometric_offsets and sampled at the integer offsets of
    the new window by linear interpolation along dx, then along dy (bilinear on that non-uniform grid)."""
    src = math.isqrt(table.shape[0])
    positions = _geometric_offsets(src // 2, side // 2)
    targets = np.arange(-(side // 2), side // 2 + 1, dtype=np.float64)
    heads = []
    for head in table.double().numpy().T:
        grid = head.reshape(src, src)
        along_x = np.stack([np.interp(targets, positions, row) for row in grid])
        heads.append(np.stack([np.interp(targets, positions, col) for col in along_x.T]).T.reshape(-1))
    return torch.from_numpy(np.stack(heads, axis=1)).float()


@pytest.mark.parametrize('case,module,name,img_size', [
    ('pvt_released_layout', flatten_pvt, 'flatten_pvt_tiny', 96),
    ('swin_llss_224', flatten_swin, 'flatten_swin_tiny_patch4_224', 384),
    ('cswin_llss_224', flatten_cswin, 'flatten_cswin_tiny_224', 256),
])
def test_checkpoint_at_another_resolution_loads_resized_official_tables(case, module, name, img_size):
    """An official checkpoint loaded into a model of another training resolution: key positional encodings and
    PVT position embeddings are the official tables resized bilinearly to each stage's grid (img_size / stride),
    Swin's relative position bias tables are resampled to the larger softmax window, and every other tensor is
    the official one, unchanged."""
    meta, tensors = parity_case(case)
    official = official_state_dict(tensors)
    kwargs = model_kwargs_for(meta)
    # the same checkpoint converted at its own resolution: the official tensors under this project's names
    # (what test_parity checks), nothing resized
    as_trained = module.checkpoint_filter_fn(dict(official), timm.create_model(name, **kwargs))
    kwargs.update(img_size=img_size)
    if 'window_size' in kwargs:
        kwargs.update(window_size=96)  # the 384 recipe: linear window 96, softmax window 12
    model = timm.create_model(name, **kwargs).eval()
    model.load_state_dict(module.checkpoint_filter_fn(dict(official), model), strict=True)
    loaded = model.state_dict()

    resized = set()
    for key, trained in as_trained.items():
        got = loaded[key]
        if got.shape == trained.shape:
            assert torch.equal(got, trained), key
            continue
        resized.add(key.rsplit('.', 1)[-1])
        stride = 4 * 2 ** int(key.split('.')[1])  # stages.{i}.
        if key.endswith(('positional_encoding', 'pos_embed')):
            side = img_size // stride  # the stage's grid (Swin's linear windows cover their whole stage here)
            assert got.shape == (1, side * side, trained.shape[2]), key
            torch.testing.assert_close(got, _bilinear_on_grid(trained, side), rtol=0, atol=1e-6, msg=key)
        else:
            assert key.endswith('relative_position_bias_table'), f'{key} was resized'
            side = 2 * 12 - 1  # offsets of a 12 x 12 window
            assert got.shape == (side * side, trained.shape[1]), key
            # timm finds q by bisection to 1e-6, which moves values by up to 4e-6 here
            torch.testing.assert_close(got, _resized_bias_table(trained, side), rtol=0, atol=1e-5, msg=key)
    assert resized == {'pvt_released_layout': {'positional_encoding', 'pos_embed'},
                       'swin_llss_224': {'positional_encoding', 'relative_position_bias_table'},
                       'cswin_llss_224': {'positional_encoding'}}[case]
