""" timm's own model tests (tests/test_models.py of the installed timm release) on every flatten_* model.

timm's tests ship in its source distribution, which is fetched from the package index once and
cached; without an index the test skips, saying so.
"""
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import timm

CACHE = Path(os.environ.get('FLATTEN_TIMM_CACHE', Path.home() / '.cache' / 'flatten_timm'))
# forward, backward (128x128), default cfgs, forward_features, features_only and forward_intermediates; and the
# torch.fx ones (a traced forward equal to the model's, a traced backward), run as a second group so that
# pytest-xdist gives each group its own worker
TIMM_TESTS = {
    'models': ['test_model_forward', 'test_model_backward', 'test_model_default_cfgs', 'test_model_forward_features',
               'test_model_forward_intermediates_features', 'test_model_forward_intermediates',
               'test_model_default_cfgs_non_std'],
    'fx': ['test_model_forward_fx', 'test_model_backward_fx'],
}
# timm's tests of a non-standard model (FLatten-DeiT, with timm's DeiTs): its default cfgs by their own test, and
# no forward_features test
NON_STANDARD_SKIPS = {'test_model_default_cfgs', 'test_model_forward_features'}
NON_STANDARD_ONLY = {'test_model_default_cfgs_non_std'}


def _expected_passes(group: str) -> int:
    tests = set(TIMM_TESTS[group])
    non_standard = len(timm.list_models('flatten_deit*'))
    standard = len(timm.list_models('flatten_*')) - non_standard
    return standard * len(tests - NON_STANDARD_ONLY) + non_standard * len(tests - NON_STANDARD_SKIPS)


def _timm_test_models() -> Path:
    target = CACHE / f'timm-{timm.__version__}-tests'
    if (target / 'test_models.py').is_file():
        return target
    download = CACHE / 'sdist'
    result = subprocess.run(
        [sys.executable, '-m', 'pip', 'download', f'timm=={timm.__version__}', '--no-binary', ':all:',
         '--no-deps', '-q', '-d', str(download)], capture_output=True, text=True, timeout=300)
    sdists = sorted(download.glob(f'timm-{timm.__version__}.tar.gz'))
    if not sdists:
        pytest.skip(f'could not fetch the timm {timm.__version__} source distribution: {result.stderr[-300:]}')
    with tarfile.open(sdists[0]) as tar:
        for member in ('test_models.py', 'conftest.py', '__init__.py'):
            source = tar.extractfile(f'timm-{timm.__version__}/tests/{member}')
            target.mkdir(parents=True, exist_ok=True)
            (target / member).write_bytes(source.read())
    return target


@pytest.mark.parametrize('group', sorted(TIMM_TESTS))
def test_timm_model_tests_pass_for_every_flatten_model(group):
    tests_dir = _timm_test_models()
    selection = ' or '.join(f'{t}[' for t in TIMM_TESTS[group])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get('PYTHONPATH', '')]))
    result = subprocess.run(
        [sys.executable, '-m', 'pytest', str(tests_dir / 'test_models.py'), '-p', 'timm_suite_plugin',
         '-k', f'flatten_ and ({selection})', '-q', '-W', 'ignore', '-p', 'no:cacheprovider', '-p', 'no:randomly',
         '-o', 'addopts=', '--rootdir', str(tests_dir)],
        cwd=tests_dir, env=env, capture_output=True, text=True, timeout=1500)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-2000:]
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    passed = int(re.search(r'(\d+) passed', summary).group(1))
    assert passed == _expected_passes(group), summary
