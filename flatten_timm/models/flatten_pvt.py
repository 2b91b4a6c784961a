""" FLatten-PVT: Pyramid Vision Transformer (v1) with focused linear attention

Papers:
* `FLatten Transformer: Vision Transformer using Focused Linear Attention` - https://arxiv.org/abs/2308.00442
* `Pyramid Vision Transformer` - https://arxiv.org/abs/2102.12122

Official code: https://github.com/LeapLabTHU/FLatten-Transformer
Outputs equal the official models; official checkpoints convert on load (`checkpoint_filter_fn`).
"""
from functools import partial
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import DropPath, LayerNorm2d, to_2tuple, trunc_normal_
from timm.models import generate_default_cfgs, register_model

from flatten_timm.layers import (
    FocusedLinearAttention, Mlp, MlpWithDepthwiseConv, PatchEmbed, SpatialReductionAttention)
from ._base import FlattenModel, build_flatten_model, init_weights, pyramid_stages, resolve_stage_args
from ._convert import fit_state_dict_to_model, fuse_qkv, rename_keys, unwrap_state_dict
from ._pretrained import default_cfg, official_cfg

__all__ = ['FlattenPvt', 'FlattenPvtBlock']


class FlattenPvtBlock(nn.Module):
    """ Pre-norm block of PVT / PVTv2: focused linear ('L') or softmax ('S') spatial-reduction attention, then MLP."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            grid_size: Tuple[int, int],
            attn_type: str = 'L',
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            sr_ratio: int = 1,
            pool_size: Optional[int] = None,
            focusing_factor: float = 3,
            kernel_size: int = 5,
            mlp_dwconv: bool = False,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            act_layer=nn.GELU,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.norm1 = norm_layer(dim, **dd)
        if attn_type == 'L':
            self.attn = FocusedLinearAttention(
                dim, num_heads, grid_size=grid_size, qkv_bias=qkv_bias, sr_ratio=sr_ratio, pool_size=pool_size,
                focusing_factor=focusing_factor, kernel_size=kernel_size, proj_drop=proj_drop, **dd)
        elif attn_type == 'S':
            self.attn = SpatialReductionAttention(
                dim, num_heads, qkv_bias=qkv_bias, sr_ratio=sr_ratio, pool_size=pool_size,
                attn_drop=attn_drop, proj_drop=proj_drop, **dd)
        else:
            raise ValueError(f"attn_type must be 'L' (focused linear) or 'S' (softmax), got {attn_type!r}")
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        hidden = int(dim * mlp_ratio)
        self.mlp_dwconv = mlp_dwconv
        if mlp_dwconv:
            self.mlp = MlpWithDepthwiseConv(
                dim, hidden, act_layer=act_layer, drop=proj_drop, extra_relu=pool_size is not None, **dd)
        else:
            self.mlp = Mlp(dim, hidden, act_layer=act_layer, drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), feat_size))
        y = self.norm2(x)
        y = self.mlp(y, feat_size) if self.mlp_dwconv else self.mlp(y)
        return x + self.drop_path2(y)


def pvt_block_args(
        num_stages: int,
        num_heads: Union[int, Sequence[int]],
        mlp_ratios: Union[float, Sequence[float]],
        attn_type: Union[str, Sequence[str]],
        sr_ratios: Union[int, Sequence[int]],
        la_sr_ratios: Union[str, Sequence[int]],
        linear: bool = False,
) -> Dict[str, tuple]:
    """ FlattenPvtBlock arguments of PVT and PVTv2, one value per stage: heads, MLP ratio, attention type, and
    how keys and values are reduced (sr_ratios for softmax stages, la_sr_ratios for focused linear ones, or,
    in PVTv2's linear mode, pooled to 7x7)."""
    num_heads = resolve_stage_args('num_heads', num_heads, num_stages)
    mlp_ratios = resolve_stage_args('mlp_ratios', mlp_ratios, num_stages)
    attn_type = resolve_stage_args('attn_type', attn_type, num_stages)
    sr_ratios = resolve_stage_args('sr_ratios', sr_ratios, num_stages)
    la_sr_ratios = [int(r) for r in resolve_stage_args('la_sr_ratios', la_sr_ratios, num_stages)]
    return dict(
        num_heads=num_heads,
        mlp_ratio=mlp_ratios,
        attn_type=attn_type,
        sr_ratio=tuple(1 if linear else (sr if t == 'S' else la_sr)
                       for t, sr, la_sr in zip(attn_type, sr_ratios, la_sr_ratios)),
        pool_size=(7 if linear else None,) * num_stages,
    )


class FlattenPvt(FlattenModel):
    """ FLatten-PVT (v1).

    Stage i (of 4) embeds with a conv of kernel = stride (4, then 2), adds a learned position
    embedding and runs its blocks; features are pooled WITHOUT a final norm, as released.

    Args:
        img_size: training resolution; sizes the position embeddings and key positional encodings.
        attn_type: per stage, 'L' focused linear or 'S' softmax attention.
        sr_ratios: spatial reduction of the softmax ('S') stages.
        la_sr_ratios: spatial reduction of the focused linear ('L') stages (1 = none, as released).
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
        block_args = pvt_block_args(len(depths), num_heads, mlp_ratios, attn_type, sr_ratios, la_sr_ratios)
        img_size = to_2tuple(img_size)
        self._init_common(in_chans, num_classes, global_pool)

        embed_norm = partial(LayerNorm2d, eps=1e-5)
        self.patch_embed = PatchEmbed(
            img_size=None, patch_size=4, in_chans=in_chans, embed_dim=embed_dims[0], norm_layer=embed_norm,
            flatten=False, output_fmt='NCHW', strict_img_size=False, **dd)
        stages = pyramid_stages(
            FlattenPvtBlock,
            embed_dims,
            depths,
            img_size,
            drop_path_rate,
            downsample_fn=lambda in_dim, out_dim: PatchEmbed(
                img_size=None, patch_size=2, in_chans=in_dim, embed_dim=out_dim, norm_layer=embed_norm,
                flatten=False, output_fmt='NCHW', strict_img_size=False, **dd),
            stage_args=block_args,
            pos_embed=True,
            drop_rate=drop_rate,
            norm_layer=norm_layer,
            qkv_bias=qkv_bias,
            focusing_factor=focusing_factor,
            kernel_size=kernel_size,
            proj_drop=proj_drop_rate,
            attn_drop=attn_drop_rate,
            **dd,
        )
        self._init_stages(stages, embed_dims)

        # the released model pools the last stage without its final norm
        self.norm = nn.Identity()
        self._init_head(embed_dims[-1], drop_rate, **dd)
        self.init_weights()

    def init_weights(self):
        for stage in self.stages:
            trunc_normal_(stage.pos_embed, std=.02)
        self.apply(init_weights)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {f'stages.{i}.pos_embed' for i in range(len(self.stages))}

    def checkpoint_filter(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return checkpoint_filter_fn(state_dict, self)


def convert_official_pvt(state_dict, model):
    """Rename official PVT / PVTv2 keys (patch_embed{i}, pos_embed{i}, block{i}.{j}, norm{i}) to this layout."""
    rules = [
        (r'^patch_embed1\.', 'patch_embed.'),
        (r'^patch_embed(\d)\.', lambda m: f'stages.{int(m.group(1)) - 1}.downsample.'),
        (r'^pos_embed(\d)$', lambda m: f'stages.{int(m.group(1)) - 1}.pos_embed'),
        (r'^block(\d)\.', lambda m: f'stages.{int(m.group(1)) - 1}.blocks.'),
        (r'^norm(\d)\.', lambda m: f'stages.{int(m.group(1)) - 1}.norm.'),
        (r'\.attn\.sr\.', '.attn.sr.conv.'),
        (r'\.attn\.norm\.', '.attn.sr.norm.'),
        (r'\.mlp\.dwconv\.dwconv\.', '.mlp.dwconv.'),
        # PVT v1 defines a final norm that its forward never applies
        (r'^norm\..*', ''),
    ]
    state_dict = rename_keys(state_dict, rules)
    return fuse_qkv(state_dict, model)


def checkpoint_filter_fn(state_dict, model: nn.Module):
    """ Official FLatten-PVT or FLatten-PVTv2 checkpoint (bare or under 'model') -> this layout, resized to
    the model (both use the same key layout)."""
    state_dict = unwrap_state_dict(state_dict)
    if 'patch_embed1.proj.weight' in state_dict:
        state_dict = convert_official_pvt(state_dict, model)
    return fit_state_dict_to_model(state_dict, model)


def _create_flatten_pvt(variant: str, pretrained: bool = False, **kwargs) -> FlattenPvt:
    return build_flatten_model(
        FlattenPvt, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


default_cfgs = generate_default_cfgs({
    'flatten_pvt_tiny.in1k': official_cfg('3ab1d773f19d45648690', 'flatten_pvt_t.pth'),
    'flatten_pvt_small': default_cfg(),
    'flatten_pvt_medium': default_cfg(),
    'flatten_pvt_large': default_cfg(),
})


@register_model
def flatten_pvt_tiny(pretrained: bool = False, **kwargs) -> FlattenPvt:
    model_args = dict(depths=(2, 2, 2, 2))
    return _create_flatten_pvt('flatten_pvt_tiny', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def flatten_pvt_small(pretrained: bool = False, **kwargs) -> FlattenPvt:
    model_args = dict(depths=(3, 4, 6, 3))
    return _create_flatten_pvt('flatten_pvt_small', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def flatten_pvt_medium(pretrained: bool = False, **kwargs) -> FlattenPvt:
    model_args = dict(depths=(3, 4, 18, 3))
    return _create_flatten_pvt('flatten_pvt_medium', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def flatten_pvt_large(pretrained: bool = False, **kwargs) -> FlattenPvt:
    model_args = dict(depths=(3, 8, 27, 3))
    return _create_flatten_pvt('flatten_pvt_large', pretrained=pretrained, **dict(model_args, **kwargs))
