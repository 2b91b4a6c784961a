""" FLatten-PVTv2: Pyramid Vision Transformer v2 with focused linear attention

Papers:
* `FLatten Transformer: Vision Transformer using Focused Linear Attention` - https://arxiv.org/abs/2308.00442
* `PVT v2: Improved Baselines with Pyramid Vision Transformer` - https://arxiv.org/abs/2106.13797

Official code: https://github.com/LeapLabTHU/FLatten-Transformer
Outputs equal the official models; official checkpoints convert on load (`checkpoint_filter_fn`).
"""
import math
from functools import partial
from typing import Dict, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import to_2tuple
from timm.models import generate_default_cfgs, register_model

from flatten_timm.layers import ConvEmbed
from ._base import FlattenModel, build_flatten_model, init_weights, pyramid_stages, resolve_stage_args
from ._pretrained import default_cfg, official_cfg
# PVTv2 runs PVT's block, and its official checkpoints use PVT's key layout
from .flatten_pvt import FlattenPvtBlock, checkpoint_filter_fn, pvt_block_args

__all__ = ['FlattenPvtV2']


class FlattenPvtV2(FlattenModel):
    """ FLatten-PVTv2.

    Overlapping conv patch embeddings (7x7 stride 4, then 3x3 stride 2), no absolute position
    embedding, an MLP with a depthwise 3x3 conv, and a norm after every stage.

    Args:
        img_size: training resolution; sizes the key positional encodings.
        attn_type: per stage, 'L' focused linear or 'S' softmax attention.
        sr_ratios: spatial reduction of the softmax ('S') stages.
        la_sr_ratios: spatial reduction of the focused linear ('L') stages (1 = none, as released).
        linear: PVTv2's "linear" mode: keys/values pooled to 7x7 (and a ReLU in the MLP).
        focusing_factor, kernel_size: of the focused linear attention.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            embed_dims: Sequence[int] = (64, 128, 320, 512),
            depths: Sequence[int] = (2, 2, 2, 2),
            num_heads: Sequence[int] = (1, 2, 5, 8),
            mlp_ratios: Sequence[float] = (8, 8, 4, 4),
            qkv_bias: bool = True,
            attn_type: str = 'LLLL',
            sr_ratios: Sequence[int] = (8, 4, 2, 1),
            la_sr_ratios: Union[str, Sequence[int]] = '1111',
            linear: bool = False,
            focusing_factor: float = 3,
            kernel_size: int = 5,
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        embed_dims = resolve_stage_args('embed_dims', embed_dims, len(depths))
        block_args = pvt_block_args(
            len(depths), num_heads, mlp_ratios, attn_type, sr_ratios, la_sr_ratios, linear=linear)
        img_size = to_2tuple(img_size)
        self._init_common(in_chans, num_classes, global_pool)

        self.patch_embed = ConvEmbed(in_chans, embed_dims[0], kernel_size=7, stride=4, padding=3, **dd)
        stages = pyramid_stages(
            FlattenPvtBlock,
            embed_dims,
            depths,
            img_size,
            drop_path_rate,
            downsample_fn=lambda in_dim, out_dim: ConvEmbed(
                in_dim, out_dim, kernel_size=3, stride=2, padding=1, **dd),
            stage_args=block_args,
            stage_norm=True,
            norm_layer=norm_layer,
            qkv_bias=qkv_bias,
            focusing_factor=focusing_factor,
            kernel_size=kernel_size,
            mlp_dwconv=True,
            proj_drop=proj_drop_rate,
            attn_drop=attn_drop_rate,
            **dd,
        )
        self._init_stages(stages, embed_dims)

        self.norm = nn.Identity()  # every stage ends in its own norm
        self._init_head(embed_dims[-1], drop_rate, **dd)
        self.apply(_init_weights)

    @torch.jit.ignore
    def no_weight_decay(self):
        return set()

    def checkpoint_filter(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return checkpoint_filter_fn(state_dict, self)


def _init_weights(m: nn.Module):
    """The shared init, plus PVTv2's fan-out normal init of convs."""
    init_weights(m)
    if isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def _create_flatten_pvt_v2(variant: str, pretrained: bool = False, **kwargs) -> FlattenPvtV2:
    return build_flatten_model(
        FlattenPvtV2, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


default_cfgs = generate_default_cfgs({
    'flatten_pvt_v2_b0.in1k': official_cfg('5d1f01532b104da28e7b', 'flatten_pvt_v2_b0.pth'),
    'flatten_pvt_v2_b1': default_cfg(),
    'flatten_pvt_v2_b2': default_cfg(),
    'flatten_pvt_v2_b3': default_cfg(),
    'flatten_pvt_v2_b4': default_cfg(),
    'flatten_pvt_v2_b5': default_cfg(),
})


@register_model
def flatten_pvt_v2_b0(pretrained: bool = False, **kwargs) -> FlattenPvtV2:
    model_args = dict(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2))
    return _create_flatten_pvt_v2('flatten_pvt_v2_b0', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def flatten_pvt_v2_b1(pretrained: bool = False, **kwargs) -> FlattenPvtV2:
    model_args = dict(depths=(2, 2, 2, 2))
    return _create_flatten_pvt_v2('flatten_pvt_v2_b1', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def flatten_pvt_v2_b2(pretrained: bool = False, **kwargs) -> FlattenPvtV2:
    model_args = dict(depths=(3, 4, 6, 3))
    return _create_flatten_pvt_v2('flatten_pvt_v2_b2', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def flatten_pvt_v2_b3(pretrained: bool = False, **kwargs) -> FlattenPvtV2:
    model_args = dict(depths=(3, 4, 18, 3))
    return _create_flatten_pvt_v2('flatten_pvt_v2_b3', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def flatten_pvt_v2_b4(pretrained: bool = False, **kwargs) -> FlattenPvtV2:
    model_args = dict(depths=(3, 8, 27, 3))
    return _create_flatten_pvt_v2('flatten_pvt_v2_b4', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def flatten_pvt_v2_b5(pretrained: bool = False, **kwargs) -> FlattenPvtV2:
    model_args = dict(depths=(3, 6, 40, 3), mlp_ratios=(4, 4, 4, 4))
    return _create_flatten_pvt_v2('flatten_pvt_v2_b5', pretrained=pretrained, **dict(model_args, **kwargs))
