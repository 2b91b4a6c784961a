""" Conversion into timm Hub folders, loading them back through `hf-hub:`, and the predict command."""
import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import PARITY_CASES, model_kwargs_for, official_state_dict, parity_case
from flatten_timm.checkpoint import create_model_from_checkpoint
from flatten_timm.cli import main
from flatten_timm.hub import convert_checkpoint
from hub_server import HubServer, recording_hub_api

REPO_ID = 'flatten-test/flatten_pvt_tiny.tiny'

# the Hub endpoint is read when huggingface_hub is imported, so Hub loads run in a fresh interpreter
LOAD_FROM_HUB = """
import sys, timm, torch, flatten_timm
model = timm.create_model(sys.argv[1], pretrained=True, **eval(sys.argv[2])).eval()
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[3])), sys.argv[4])
"""


def _official_checkpoint(tmp_path):
    meta, tensors = parity_case('pvt_released_layout')
    path = tmp_path / 'official.pth'
    torch.save({'model': official_state_dict(tensors), 'epoch': 299}, path)
    return path, model_kwargs_for(meta), tensors


def _hub_env(tmp_path, hub_url):
    env = dict(os.environ, HF_HOME=str(tmp_path / 'hf_home'), HF_HUB_DISABLE_TELEMETRY='1', HF_ENDPOINT=hub_url)
    env.pop('HF_HUB_OFFLINE', None)
    return env


def _outputs_of_hub_model(tmp_path, env, name, x, **kwargs):
    """Logits of create_model(name, pretrained=True, **kwargs) on x, in a subprocess with env."""
    torch.save(x, tmp_path / 'x.pt')
    out = tmp_path / 'out.pt'
    out.unlink(missing_ok=True)
    subprocess.run([sys.executable, '-c', LOAD_FROM_HUB, name, repr(kwargs), str(tmp_path / 'x.pt'), str(out)],
                   env=env, check=True, timeout=300)
    return torch.load(out)


@pytest.mark.skipif(not PARITY_CASES, reason='parity fixtures (tests/fixtures/parity) are absent')
def test_converted_folder_round_trips_through_a_local_hub(tmp_path):
    checkpoint, kwargs, tensors = _official_checkpoint(tmp_path)
    folder = convert_checkpoint('flatten_pvt_tiny', checkpoint, tmp_path / 'hub' / 'folder',
                                repo_name=REPO_ID, **kwargs)
    assert sorted(p.name for p in folder.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    config = json.loads((folder / 'config.json').read_text())
    assert config['architecture'] == 'flatten_pvt_tiny' and config['num_classes'] == 10
    assert config['pretrained_cfg']['crop_mode'] == 'squash'
    card = (folder / 'README.md').read_text()
    assert 'license: other' in card and 'FLatten Transformer' in card and REPO_ID in card

    x = tensors['input']
    local = create_model_from_checkpoint('flatten_pvt_tiny', str(checkpoint), **kwargs).eval()
    with torch.no_grad():
        expected = local(x)
    torch.testing.assert_close(expected, tensors['logits'], atol=1e-4, rtol=0)

    with HubServer({REPO_ID: folder}) as hub:
        env = _hub_env(tmp_path, hub.url)
        online = _outputs_of_hub_model(tmp_path, env, f'hf-hub:{REPO_ID}', x)
        assert any('model.safetensors' in r for r in hub.requests)
        served = len(hub.requests)
        offline = _outputs_of_hub_model(tmp_path, dict(env, HF_HUB_OFFLINE='1'), f'hf-hub:{REPO_ID}', x)
        assert len(hub.requests) == served, 'the offline load used the network'
    torch.testing.assert_close(online, expected, rtol=0, atol=0)
    torch.testing.assert_close(offline, expected, rtol=0, atol=0)


def test_convert_command_and_predict_with_the_result(tmp_path, capsys):
    model = timm.create_model('flatten_pvt_v2_b0')
    torch.save({'model': model.state_dict(), 'optimizer': {}}, tmp_path / 'ckpt.pth')
    assert main(['convert', '--model', 'flatten_pvt_v2_b0', '--checkpoint', str(tmp_path / 'ckpt.pth'),
                 '--output', str(tmp_path / 'out')]) == 0
    assert 'model.safetensors' in capsys.readouterr().out
    converted = load_file(str(tmp_path / 'out' / 'model.safetensors'))
    assert converted.keys() == model.state_dict().keys()
    assert all(torch.equal(converted[k], v) for k, v in model.state_dict().items())

    image = tmp_path / 'cat.png'
    Image.new('RGB', (300, 200), (200, 120, 40)).save(image)
    assert main(['predict', '--model', 'flatten_pvt_v2_b0', '--checkpoint',
                 str(tmp_path / 'out' / 'model.safetensors'), str(image)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == str(image) and len(lines) == 6
    from timm.data import ImageNetInfo
    info = ImageNetInfo()
    names = {info.index_to_description(i) for i in range(1000)}
    assert all(line.split('%', 1)[1].strip() in names for line in lines[1:])


def test_commands_fail_clearly(tmp_path, capsys):
    assert main(['predict', '--model', 'flatten_nope', str(tmp_path / 'x.png')]) == 2
    assert 'Unknown model' in capsys.readouterr().err
    assert main(['convert', '--model', 'flatten_pvt_v2_b0', '--checkpoint', str(tmp_path / 'missing.pth'),
                 '--output', str(tmp_path / 'out')]) == 2
    assert 'not found' in capsys.readouterr().err
    (tmp_path / 'bad.png').write_text('not an image')
    with pytest.raises(SystemExit, match='cannot read image'):
        main(['predict', '--model', 'flatten_pvt_v2_b0', str(tmp_path / 'bad.png')])


def test_hub_id_overlay_on_a_released_config_loads_the_users_copy(tmp_path):
    """`pretrained_cfg_overlay=dict(hf_hub_id=...)` points a released tag at one's own Hub copy."""
    model = timm.create_model('flatten_pvt_v2_b0').eval()
    folder = tmp_path / 'repo'
    folder.mkdir()
    torch.save({'model': model.state_dict(), 'epoch': 299}, folder / 'pytorch_model.bin')
    x = torch.randn(1, 3, 64, 64)
    with HubServer({'me/b0': folder}) as hub, torch.no_grad():
        loaded = _outputs_of_hub_model(tmp_path, _hub_env(tmp_path, hub.url), 'flatten_pvt_v2_b0.in1k', x,
                                       pretrained_cfg_overlay=dict(hf_hub_id='me/b0'))
        expected = model(x)  # in inference, as the subprocess runs it (the same ops, bit for bit)
    torch.testing.assert_close(loaded, expected, rtol=0, atol=0)


def test_push_to_hub_uploads_the_converted_folder(tmp_path, monkeypatch, capsys):
    """The upload itself needs the real Hub; what is checked is that the converted folder is what goes up."""
    import huggingface_hub
    uploads = []
    monkeypatch.setattr(huggingface_hub, 'HfApi', recording_hub_api(uploads))
    torch.save(timm.create_model('flatten_pvt_v2_b0').state_dict(), tmp_path / 'b0.pth')
    assert main(['convert', '--model', 'flatten_pvt_v2_b0', '--checkpoint', str(tmp_path / 'b0.pth'),
                 '--output', str(tmp_path / 'out'), '--push-to-hub', 'me/flatten_pvt_v2_b0.in1k']) == 0
    assert uploads == [('me/flatten_pvt_v2_b0.in1k', ['README.md', 'config.json', 'model.safetensors'])]
    assert 'https://huggingface.co/me/flatten_pvt_v2_b0.in1k' in capsys.readouterr().out
    assert 'hf-hub:me/flatten_pvt_v2_b0.in1k' in (tmp_path / 'out' / 'README.md').read_text()


def test_pretrained_download_failure_is_explained(tmp_path, monkeypatch, capsys):
    import urllib.error
    import timm.models._builder as builder

    def offline(*args, **kwargs):
        raise urllib.error.URLError('Name or service not known')
    monkeypatch.setattr(builder, 'download_cached_file', offline)
    image = tmp_path / 'x.png'
    Image.new('RGB', (64, 64)).save(image)
    assert main(['predict', '--model', 'flatten_pvt_v2_b0', '--pretrained', str(image)]) == 2
    assert 'could not download the weights' in capsys.readouterr().err


def test_a_checkpoint_at_another_size_gets_the_pool_size_of_its_family():
    """A pyramid's final map is at stride 32, so its pool size follows the input size; a ViT has none to follow."""
    from flatten_timm.hub import model_kwargs_from_config
    pyramid = model_kwargs_from_config(
        'flatten_pvt_tiny', {'pretrained_cfg': {'input_size': [3, 320, 320], 'pool_size': [7, 7]}}, {})
    vit = model_kwargs_from_config(
        'flatten_deit_tiny_patch16_224', {'pretrained_cfg': {'input_size': [3, 320, 320], 'pool_size': None}}, {})
    assert pyramid['pretrained_cfg_overlay']['pool_size'] == (10, 10)
    assert vit['pretrained_cfg_overlay']['pool_size'] is None
