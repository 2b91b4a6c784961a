import importlib.util
import json
import os
from pathlib import Path

# Without a GPU the Triton kernels are tested under Triton's CPU interpreter, which has to be chosen before
# torch first imports triton (its library functions are compiled or interpreted from then on)
if 'TRITON_INTERPRET' not in os.environ and not Path('/dev/nvidiactl').exists():
    os.environ['TRITON_INTERPRET'] = '1'

import pytest  # noqa: E402
import torch  # noqa: E402

import flatten_timm  # noqa: F401,E402  registers the models

# pytest-xdist runs one process per core: one torch thread each, or their thread pools oversubscribe the cores
# (in-process training tests ran 10-16x slower)
if os.environ.get('PYTEST_XDIST_WORKER'):
    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
# golden outputs of the official code, kept in the repository (FLATTEN_PARITY_DIR points at another copy)
PARITY_DIR = Path(os.environ.get('FLATTEN_PARITY_DIR', REPO / 'tests' / 'fixtures' / 'parity'))
PARITY_CASES = sorted(p.stem for p in PARITY_DIR.glob('*.json')) if PARITY_DIR.is_dir() else []

# the registered model each official family is built from, and official kwargs that are not ours
FAMILY_MODEL = {
    'pvt': 'flatten_pvt_tiny',
    'pvt_v2': 'flatten_pvt_v2_b0',
    'swin': 'flatten_swin_tiny_patch4_224',
    'cswin': 'flatten_cswin_tiny_224',
}
KWARG_RENAMES = {'depth': 'depths', 'mlp_ratio': 'mlp_ratios'}
# fixed by the architecture here (patch size, norm eps), or implied (CSWin linear blocks span the whole map)
KWARGS_NOT_OURS = {'patch_size', 'norm_layer', 'la_split_size'}


def load_script(path) -> object:
    """A script of the repository (a path relative to its root, e.g. 'scripts/train.py') as a module."""
    path = REPO / path
    spec = importlib.util.spec_from_file_location(path.stem + '_script', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parity_case(name: str):
    """(json description, tensors) of one official golden output."""
    if not PARITY_DIR.is_dir():
        pytest.skip(f'parity fixtures not found at {PARITY_DIR} (set FLATTEN_PARITY_DIR)')
    from safetensors.torch import load_file
    meta = json.loads((PARITY_DIR / f'{name}.json').read_text())
    return meta, load_file(str(PARITY_DIR / f'{name}.safetensors'))


def model_kwargs_for(meta: dict) -> dict:
    """Our create_model kwargs for the official model described in a parity case."""
    kwargs = {KWARG_RENAMES.get(k, k): v for k, v in meta['official_kwargs'].items() if k not in KWARGS_NOT_OURS}
    assert meta['official_kwargs'].get('norm_layer', 'LayerNorm(eps=1e-6)') == 'LayerNorm(eps=1e-6)'
    return kwargs


def official_state_dict(tensors: dict) -> dict:
    return {k[len('official.'):]: v for k, v in tensors.items() if k.startswith('official.')}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
