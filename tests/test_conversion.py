""" Official checkpoints at another resolution, and what the converter keeps or drops."""
import pytest
import timm
import torch

from conftest import PARITY_CASES, model_kwargs_for, official_state_dict, parity_case
from flatten_timm.models import flatten_cswin, flatten_pvt, flatten_swin

pytestmark = pytest.mark.skipif(not PARITY_CASES, reason='parity fixtures (tests/fixtures/parity) are absent')


@pytest.mark.parametrize('case,module,name,img_size', [
    ('pvt_released_layout', flatten_pvt, 'flatten_pvt_tiny', 96),
    ('swin_llss_224', flatten_swin, 'flatten_swin_tiny_patch4_224', 384),
    ('cswin_llss_224', flatten_cswin, 'flatten_cswin_tiny_224', 256),
])
def test_checkpoint_loads_into_another_training_resolution(case, module, name, img_size):
    meta, tensors = parity_case(case)
    kwargs = dict(model_kwargs_for(meta), img_size=img_size)
    if 'window_size' in kwargs:
        kwargs.update(window_size=96)  # the 384 recipe: linear window 96, softmax window 12
    model = timm.create_model(name, **kwargs).eval()
    state_dict = module.checkpoint_filter_fn(official_state_dict(tensors), model)
    model.load_state_dict(state_dict, strict=True)
    out = model(torch.randn(1, 3, img_size, img_size))
    assert torch.isfinite(out).all()


def test_swin_buffers_are_rebuilt_not_loaded():
    meta, tensors = parity_case('swin_llss_224')
    model = timm.create_model('flatten_swin_tiny_patch4_224', **model_kwargs_for(meta))
    state_dict = flatten_swin.checkpoint_filter_fn(official_state_dict(tensors), model)
    assert not any(k.endswith(('relative_position_index', 'attn_mask')) for k in state_dict)
    assert any(k.endswith('relative_position_index') for k in official_state_dict(tensors))


def test_converted_state_dict_round_trips():
    """A state dict saved from this layout loads back unchanged through the same filter."""
    meta, tensors = parity_case('cswin_llss_224')
    model = timm.create_model('flatten_cswin_tiny_224', **model_kwargs_for(meta)).eval()
    converted = flatten_cswin.checkpoint_filter_fn(official_state_dict(tensors), model)
    again = flatten_cswin.checkpoint_filter_fn(converted, model)
    assert again.keys() == converted.keys()
    assert all(torch.equal(again[k], converted[k]) for k in converted)
