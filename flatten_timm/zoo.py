""" The model zoo: registered names, their size and compute, and the released ImageNet-1k accuracy."""
from dataclasses import dataclass
from typing import List, Optional, Tuple

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ['RELEASED_TOP1', 'ZooEntry', 'list_flatten_models', 'describe_model', 'count_params_and_gmacs']

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


def count_params_and_gmacs(model: torch.nn.Module, input_size) -> Tuple[float, float]:
    """(params in M, GMACs for one image of input_size (C, H, W)); run on the meta device it costs nothing."""
    params = sum(p.numel() for p in model.parameters())
    device = next(model.parameters()).device
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.empty(1, *input_size, device=device))
    return params / 1e6, counter.get_total_flops() / 2e9


def describe_model(name: str) -> ZooEntry:
    """Parameters and GMACs (FLOPs / 2 from torch.utils.flop_counter) at the model's default input size.

    Counted on the meta device: nothing is allocated or computed.
    """
    model = timm.create_model(name, device='meta')
    input_size = model.pretrained_cfg['input_size']
    params_m, gmacs = count_params_and_gmacs(model, input_size)
    return ZooEntry(name, input_size[-1], params_m, gmacs, RELEASED_TOP1.get(name))
