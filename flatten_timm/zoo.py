""" The model zoo: registered names, their size and compute, and the released ImageNet-1k accuracy.

Parameters and GMACs depend only on the code, so they are counted once and kept in `model_zoo.json`
beside this file; `flatten-timm models` reads that table (counting all 18 models takes about 20 s).
After changing a model, regenerate it with `python -m flatten_timm.zoo --write`; the tests check
that the table matches what the code counts.
"""
import argparse
import fnmatch
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ['RELEASED_TOP1', 'ZOO_TABLE', 'ZooEntry', 'list_flatten_models', 'filter_models', 'describe_model',
           'count_model', 'count_params_and_gmacs', 'load_zoo_table', 'write_zoo_table']

# top-1 (%) of the released checkpoints, from the official README
RELEASED_TOP1 = {
    'flatten_pvt_tiny': 77.8,
    'flatten_pvt_v2_b0': 71.1,
    'flatten_swin_tiny_patch4_224': 82.1,
    'flatten_swin_small_patch4_224': 83.5,
    'flatten_swin_base_patch4_224': 83.8,
    'flatten_swin_base_patch4_384': 85.0,
    'flatten_cswin_tiny_224': 83.1,
}

ZOO_TABLE = Path(__file__).with_name('model_zoo.json')


@dataclass
class ZooEntry:
    name: str
    img_size: int
    params_m: float
    gmacs: float
    top1: Optional[float]


def list_flatten_models() -> List[str]:
    """Every flatten_* architecture registered with timm."""
    return timm.list_models('flatten_*')


def filter_models(names: List[str], pattern: str) -> List[str]:
    """ The names matching a timm-style wildcard pattern (as `timm.list_models(filter=...)` matches them).

    The pattern may leave out the 'flatten_' prefix, and one without wildcards matches the names that
    start with it: 'swin_base' gives the FLatten-Swin-B models and not FLatten-CSWin-B, '*swin_base*' both.
    """
    if not pattern:
        return list(names)
    if not any(c in pattern for c in '*?['):
        pattern += '*'
    return [n for n in names if fnmatch.fnmatch(n, pattern) or fnmatch.fnmatch(n.removeprefix('flatten_'), pattern)]


def count_params_and_gmacs(model: torch.nn.Module, input_size) -> Tuple[float, float]:
    """(params in M, GMACs for one image of input_size (C, H, W)); run on the meta device it costs nothing."""
    params = sum(p.numel() for p in model.parameters())
    device = next(model.parameters()).device
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.empty(1, *input_size, device=device))
    return params / 1e6, counter.get_total_flops() / 2e9


def count_model(name: str) -> ZooEntry:
    """ Parameters and GMACs (FLOPs / 2 from torch.utils.flop_counter) at the model's default input size, counted now.

    Counted on the meta device: nothing is allocated or computed (about a second per model all the same).
    """
    model = timm.create_model(name, device='meta')
    input_size = model.pretrained_cfg['input_size']
    params_m, gmacs = count_params_and_gmacs(model, input_size)
    return ZooEntry(name, input_size[-1], params_m, gmacs, RELEASED_TOP1.get(name))


@lru_cache(maxsize=None)
def load_zoo_table() -> Dict[str, ZooEntry]:
    """The counted table of `model_zoo.json`, by model name ({} if the file is missing)."""
    if not ZOO_TABLE.is_file():
        return {}
    rows = json.loads(ZOO_TABLE.read_text(encoding='utf-8'))['models']
    return {r['name']: ZooEntry(r['name'], r['img_size'], r['params_m'], r['gmacs'], RELEASED_TOP1.get(r['name']))
            for r in rows}


def describe_model(name: str) -> ZooEntry:
    """Parameters and GMACs at the model's default input size: from the counted table, or counted now if absent."""
    entry = load_zoo_table().get(name)
    return entry if entry is not None else count_model(name)


def write_zoo_table(path: Path = ZOO_TABLE, progress=None) -> List[ZooEntry]:
    """Count every registered flatten model and write the table; progress(text) is told about each."""
    names = list_flatten_models()
    entries = []
    for i, name in enumerate(names):
        if progress is not None:
            progress(f'[{i + 1}/{len(names)}] counting {name}')
        entries.append(count_model(name))
    rows = [dict(name=e.name, img_size=e.img_size, params_m=round(e.params_m, 6), gmacs=round(e.gmacs, 6))
            for e in entries]
    lines = ',\n'.join(f'  {json.dumps(row)}' for row in rows)  # one model a line: a change shows as one
    text = f'{{"generated_by": "python -m flatten_timm.zoo --write",\n "models": [\n{lines}\n ]}}\n'
    Path(path).write_text(text, encoding='utf-8')
    load_zoo_table.cache_clear()
    return entries


def main(argv=None):
    """`python -m flatten_timm.zoo --write`: count every model again and rewrite the table."""
    import logging
    parser = argparse.ArgumentParser(description='Count the params and GMACs of every flatten model into '
                                                 f'{ZOO_TABLE.name}, the table `flatten-timm models` prints.')
    parser.add_argument('--write', action='store_true', required=True, help=f'rewrite {ZOO_TABLE}')
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    logger = logging.getLogger(__name__)
    import flatten_timm  # noqa: F401  registers the models
    write_zoo_table(progress=logger.info)
    logger.info(f'wrote {ZOO_TABLE}')


if __name__ == '__main__':
    main()
