import json

from flatten_timm.cli import main


def test_models_table(capsys):
    assert main(['models', '--filter', 'pvt_v2_b0']) == 0
    out = capsys.readouterr().out
    assert 'flatten_pvt_v2_b0' in out and '3.59' in out and '0.58' in out and '71.1' in out


def test_models_json(capsys):
    assert main(['models', '--filter', 'flatten_swin_tiny', '--json']) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry['name'] == 'flatten_swin_tiny_patch4_224' and round(entry['params_m'], 2) == 29.19
