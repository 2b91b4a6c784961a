""" Official FLatten weights, converted on load, give the official outputs (fixtures in tests/fixtures/parity)."""
import importlib

import pytest
import timm
import torch

from conftest import FAMILY_MODEL, PARITY_CASES, model_kwargs_for, official_state_dict, parity_case

FAMILY_MODULE = {f: f'flatten_timm.models.flatten_{f}' for f in FAMILY_MODEL}

if not PARITY_CASES:
    pytest.skip('parity fixtures (tests/fixtures/parity) are absent: nothing to compare against',
                allow_module_level=True)


@pytest.mark.parametrize('case', PARITY_CASES)
def test_official_outputs(case):
    meta, tensors = parity_case(case)
    model = timm.create_model(FAMILY_MODEL[meta['family']], **model_kwargs_for(meta)).eval()
    filter_fn = importlib.import_module(FAMILY_MODULE[meta['family']]).checkpoint_filter_fn
    # strict: every official tensor has a home and every parameter here is set
    model.load_state_dict(filter_fn(official_state_dict(tensors), model), strict=True)
    with torch.no_grad():
        features = model.forward_head(model.forward_features(tensors['input']), pre_logits=True)
        logits = model(tensors['input'])
    torch.testing.assert_close(features, tensors['features'], atol=1e-4, rtol=0)
    torch.testing.assert_close(logits, tensors['logits'], atol=1e-4, rtol=0)


@pytest.mark.parametrize('case', ['pvt_released_layout', 'swin_llss_224', 'cswin_llss_224', 'pvt_v2_la_sr8421_llls'])
def test_official_checkpoint_file_through_pretrained_cfg(case, tmp_path):
    """The user path: an official training checkpoint file ({'model': state_dict}) via pretrained=True."""
    meta, tensors = parity_case(case)
    path = tmp_path / 'official.pth'
    torch.save({'model': official_state_dict(tensors), 'epoch': 299}, path)
    model = timm.create_model(
        FAMILY_MODEL[meta['family']], pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=10),
        **model_kwargs_for(meta)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(tensors['input']), tensors['logits'], atol=1e-4, rtol=0)
