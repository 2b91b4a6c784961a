""" transformers RT-DETR and segmentation_models_pytorch on flatten backbones, and the README's framework snippets."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _tiny_rt_detr(num_labels=3):
    from transformers import RTDetrConfig, RTDetrForObjectDetection, TimmBackboneConfig
    backbone = TimmBackboneConfig(backbone='flatten_pvt_v2_b0', out_indices=(1, 2, 3))
    config = RTDetrConfig(
        backbone_config=backbone, encoder_in_channels=[64, 160, 256], num_labels=num_labels,
        d_model=64, encoder_hidden_dim=64, decoder_in_channels=[64, 64, 64], encoder_ffn_dim=128,
        decoder_ffn_dim=128, encoder_layers=1, decoder_layers=1, num_queries=20)
    return RTDetrForObjectDetection(config)


def test_transformers_rt_detr_training_step():
    pytest.importorskip('transformers')
    pytest.importorskip('scipy')  # transformers' Hungarian matcher
    model = _tiny_rt_detr()
    backbone = model.model.backbone.model._backbone
    assert backbone.feature_info.channels() == [64, 160, 256]
    labels = [{'class_labels': torch.tensor([0, 2]), 'boxes': torch.tensor([[.5, .5, .2, .3], [.3, .4, .1, .1]])},
              {'class_labels': torch.tensor([1]), 'boxes': torch.tensor([[.6, .3, .4, .2]])}]
    out = model(pixel_values=torch.randn(2, 3, 96, 128), labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for n, p in backbone.named_parameters() if 'attn' in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_transformers_rt_detr_eval_with_image_processor():
    pytest.importorskip('transformers')
    from transformers import RTDetrImageProcessor
    model = _tiny_rt_detr().eval()
    processor = RTDetrImageProcessor(size={'height': 96, 'width': 128})
    image = (np.random.default_rng(0).random((90, 140, 3)) * 255).astype(np.uint8)  # non-square
    inputs = processor(images=image, return_tensors='pt')
    with torch.no_grad():
        outputs = model(**inputs)
    (result,) = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=[(90, 140)])
    assert result['boxes'].shape == (20, 4) and result['scores'].shape == (20,)
    assert torch.isfinite(result['boxes']).all()


def test_smp_unet_training_step_non_square():
    smp = pytest.importorskip('segmentation_models_pytorch')
    model = smp.Unet('tu-flatten_pvt_v2_b0', encoder_weights=None, classes=3)
    x, target = torch.randn(2, 3, 64, 96), torch.randint(0, 3, (2, 64, 96))
    logits = model(x)
    assert logits.shape == (2, 3, 64, 96)
    loss = torch.nn.functional.cross_entropy(logits, target)
    loss.backward()
    assert torch.isfinite(loss)
    attn_grads = [p.grad for n, p in model.encoder.named_parameters() if '.attn.' in n]
    assert attn_grads and all(g is not None for g in attn_grads)


def _readme_snippets():
    text = (ROOT / 'README.md').read_text()
    section = text.split('## Detection and segmentation frameworks', 1)[1].split('\n## ', 1)[0]
    return re.findall(r'```python\n(.*?)```', section, flags=re.S)


def test_readme_has_a_snippet_per_framework():
    snippets = '\n'.join(_readme_snippets())
    for framework in ('torchvision', 'ultralytics', 'transformers', 'segmentation_models_pytorch'):
        assert f'from {framework}' in snippets or f'import {framework}' in snippets, framework


@pytest.mark.parametrize('index', range(4))
def test_readme_snippet_runs(index, monkeypatch):
    """Each snippet runs as written (from the repository root), except that weights are not downloaded."""
    pytest.importorskip('ultralytics')
    pytest.importorskip('transformers')
    pytest.importorskip('segmentation_models_pytorch')
    snippet = _readme_snippets()[index].replace('pretrained=True', 'pretrained=False')
    monkeypatch.chdir(ROOT)
    exec(compile(snippet, f'README snippet {index}', 'exec'), {'__name__': 'readme'})
