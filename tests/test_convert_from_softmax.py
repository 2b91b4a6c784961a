""" `flatten-timm convert --from-softmax`: a FLatten-DeiT warm-started from a timm softmax DeiT / ViT, written as a
timm Hub folder that loads back with the softmax weights and says it is an initialisation, not a trained model."""
import contextlib
import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from conftest import load_script
from hub_server import recording_hub_api
from flatten_timm.cli import main
from flatten_timm.hub import convert_checkpoint, convert_from_softmax, create_model_as_trained, load_checkpoint_config

SOFTMAX = 'deit_tiny_patch16_224'
MODEL = 'flatten_deit_tiny_patch16_224'
REPO_ID = 'me/flatten_deit_tiny_warm_start'
ADDED = ('attn.dwc.weight', 'attn.dwc.bias', 'attn.scale', 'attn.positional_encoding')


@pytest.fixture(scope='module')
def softmax_file(tmp_path_factory):
    """timm's deit_tiny (random weights: what matters is that they are copied) as a .safetensors file."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('softmax') / 'deit_tiny.safetensors'
    save_file(timm.create_model(SOFTMAX).state_dict(), str(path))
    return path


@pytest.fixture(scope='module')
def converted(softmax_file, tmp_path_factory):
    """The command's folder, stdout and uploads (the Hub itself is out of reach: its client records them)."""
    import huggingface_hub
    uploads = []
    folder = tmp_path_factory.mktemp('converted') / 'warm_start'
    capture = tmp_path_factory.mktemp('stdout') / 'stdout.txt'
    with pytest.MonkeyPatch.context() as mp, open(capture, 'w') as stdout, contextlib.redirect_stdout(stdout):
        mp.setattr(huggingface_hub, 'HfApi', recording_hub_api(uploads))
        rc = main(['convert', '--from-softmax', SOFTMAX, '--model', MODEL, '--checkpoint', str(softmax_file),
                   '--output', str(folder), '--push-to-hub', REPO_ID])
    assert rc == 0
    return folder, capture.read_text(), uploads


def test_folder_loads_back_with_every_shared_weight_of_the_softmax_model(converted, softmax_file):
    folder, stdout, uploads = converted
    assert sorted(p.name for p in folder.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    assert uploads == [(REPO_ID, ['README.md', 'config.json', 'model.safetensors'])]
    softmax = load_file(str(softmax_file))
    model = timm.create_model(MODEL, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(folder / 'model.safetensors')))
    state = model.state_dict()
    for k, v in softmax.items():
        assert torch.equal(state[k], v), k
    added = {f'blocks.{i}.{name}' for i in range(12) for name in ADDED}
    assert set(state) - set(softmax) == added

    # what the command says it did: the added keys left at their initialisation, nothing resampled
    assert 'not a trained classifier' in stdout
    assert 'left at their initialisation: 48 tensors' in stdout
    assert all(f'blocks.{{0..11}}.{name}' in stdout for name in ADDED)
    assert 'resampled to the patch grid: none' in stdout and 're-initialised (another shape, e.g. the class count): ' \
                                                             'none' in stdout


def test_card_and_config_say_initialisation_not_trained(converted):
    folder = converted[0]
    card = (folder / 'README.md').read_text()
    assert 'imagenet' not in card.lower() and 'top-1' not in card
    assert '**an initialisation for fine-tuning, not a trained classifier.**' in card
    assert f'`{SOFTMAX}`' in card and '- **Accuracy:** none reported' in card
    assert f"timm.create_model('hf-hub:{REPO_ID}', pretrained=True, num_classes=NUM_CLASSES)" in card

    config = json.loads((folder / 'config.json').read_text())
    assert config['warm_start_from'] == SOFTMAX and 'dataset' not in config
    assert 'initialisation for fine-tuning' in config['pretrained_cfg']['description']
    assert config['pretrained_cfg']['crop_pct'] == 0.9  # deit_tiny's preprocessing, not FLatten-DeiT's default

    # the project's own loaders read it as a warm start: no dataset, the description on the model
    weights = folder / 'model.safetensors'
    recorded = load_checkpoint_config(weights)
    assert recorded['warm_start_from'] == SOFTMAX and 'dataset' not in recorded
    model = create_model_as_trained(MODEL, weights)
    assert 'Not a trained classifier' in model.pretrained_cfg['description']
    # converting the folder's file again keeps saying so
    again = convert_checkpoint(MODEL, weights, folder.parent / 'again')
    card = (again / 'README.md').read_text()
    assert 'imagenet' not in card.lower() and 'not a trained classifier' in card
    assert json.loads((again / 'config.json').read_text())['warm_start_from'] == SOFTMAX


def _fail_downloads(monkeypatch):
    """Every pretrained download of timm fails as it does without a network; returns the attempts."""
    import timm.models._builder as builder
    from huggingface_hub.errors import LocalEntryNotFoundError
    attempts = []

    def offline(*args, **kwargs):
        attempts.append(args)
        raise LocalEntryNotFoundError('cannot find the requested files in the local cache')
    for name in ('load_state_dict_from_hf', 'load_state_dict_from_url', 'download_cached_file'):
        monkeypatch.setattr(builder, name, offline)
    return attempts


@pytest.mark.parametrize('args,message', [
    (['--from-softmax', SOFTMAX, '--model', 'flatten_pvt_tiny'], 'warm-starts FLatten-DeiT models only'),
    (['--from-softmax', 'deit_small_patch16_224', '--model', MODEL], 'the models differ in size'),
    (['--from-softmax', 'deit_nope', '--model', MODEL], "unknown softmax model 'deit_nope'"),
    (['--from-softmax', 'flatten_deit_tiny_patch16_224', '--model', MODEL], 'not a softmax one'),
    (['--from-softmax', 'deit_tiny_distilled_patch16_224', '--model', MODEL], 'use a non-distilled one'),
    (['--model', MODEL], '--checkpoint FILE is required'),
])
def test_models_that_do_not_fit_are_refused_before_any_download(args, message, tmp_path, monkeypatch, capsys):
    attempts = _fail_downloads(monkeypatch)
    assert main(['convert', *args, '--output', str(tmp_path / 'out')]) == 2
    assert message in capsys.readouterr().err
    assert not attempts and not (tmp_path / 'out').exists()


def test_file_of_another_softmax_model_is_refused(tmp_path, capsys):
    """The folder names the softmax model its weights come from: a file of another one would make that untrue."""
    torch.save({'model': timm.create_model('vit_tiny_patch16_224', depth=2).state_dict()}, tmp_path / 'other.pth')
    assert main(['convert', '--from-softmax', 'vit_tiny_patch16_224', '--model', MODEL, '--checkpoint',
                 str(tmp_path / 'other.pth'), '--output', str(tmp_path / 'out2')]) == 2
    assert "does not hold vit_tiny_patch16_224's weights" in capsys.readouterr().err


def test_no_network_names_the_offline_remedy(tmp_path, monkeypatch, capsys):
    attempts = _fail_downloads(monkeypatch)
    assert main(['convert', '--from-softmax', SOFTMAX, '--model', MODEL, '--output', str(tmp_path / 'out')]) == 2
    err = capsys.readouterr().err
    assert attempts and f'could not download the weights of {SOFTMAX}' in err
    assert '--checkpoint FILE' in err and 'https://huggingface.co/timm/deit_tiny_patch16_224.fb_in1k' in err


def test_script_converts_through_the_command(tmp_path, capsys):
    """scripts/deit_warm_start.py --convert writes the command's folder; a softmax ViT trained at another size
    has its position embedding resampled, and its preprocessing (mean / std 0.5) goes with the weights."""
    torch.manual_seed(1)
    softmax = timm.create_model('vit_tiny_patch16_224', img_size=112)
    save_file(softmax.state_dict(), str(tmp_path / 'vit_112.safetensors'))
    script = load_script('scripts/deit_warm_start.py')
    assert script.main(['--convert', str(tmp_path / 'out'), '--model', MODEL, '--softmax', 'vit_tiny_patch16_224',
                        '--softmax-checkpoint', str(tmp_path / 'vit_112.safetensors')]) == 0
    assert 'resampled to the patch grid: pos_embed' in capsys.readouterr().out
    config = json.loads((tmp_path / 'out' / 'config.json').read_text())
    assert config['warm_start_from'] == 'vit_tiny_patch16_224'
    assert config['pretrained_cfg']['mean'] == [0.5] * 3 and config['pretrained_cfg']['input_size'] == [3, 224, 224]
    converted = load_file(str(tmp_path / 'out' / 'model.safetensors'))
    assert converted['pos_embed'].shape == (1, 197, 192)
    assert torch.equal(converted['blocks.3.mlp.fc1.weight'], softmax.blocks[3].mlp.fc1.weight)
    with pytest.raises(SystemExit, match='give a folder'):
        script.main(['--convert', str(tmp_path / 'init.safetensors')])


def test_library_conversion_for_another_size_and_class_count(softmax_file, tmp_path):
    """convert_from_softmax's model keywords: a 112-pixel FLatten-DeiT with 10 classes, rebuilt from its folder."""
    folder, report = convert_from_softmax(MODEL, SOFTMAX, tmp_path / 'out', checkpoint=softmax_file,
                                          num_classes=10, img_size=112)
    assert report.resampled == ['pos_embed'] and sorted(report.reinitialised) == ['head.bias', 'head.weight']
    model = create_model_as_trained(MODEL, folder / 'model.safetensors')
    assert model.num_classes == 10 and model.pos_embed.shape == (1, 50, 192)
    assert model.pretrained_cfg['input_size'] == (3, 112, 112)
    softmax = load_file(str(softmax_file))
    assert torch.equal(model.blocks[5].attn.qkv.weight, softmax['blocks.5.attn.qkv.weight'])
