""" FLatten-DeiT: DeiT (timm's VisionTransformer) with global focused linear attention

Papers:
* `FLatten Transformer: Vision Transformer using Focused Linear Attention` - https://arxiv.org/abs/2308.00442
* `Training data-efficient image transformers & distillation through attention` - https://arxiv.org/abs/2012.12877

The official code releases no DeiT variant, so the choices the paper leaves open are made here:

* The class token (and any register token) takes part in the attention as a query and as a key, like every
  patch token: the attention stays global over all tokens. The rank-restoring depthwise conv runs on the patch
  tokens' V laid out on the patch grid; the prefix tokens have no place on the grid and get no conv term.
* Each attention keeps the learned key positional encoding of the released FLatten families (a grid table
  resized to the actual patch grid), added to the patch tokens' keys; the class token's key gets none. ViT's
  absolute position embedding is kept as well: FLatten-PVT has both too. The ReLU kernel with focusing
  sharpens the attention but has no notion of distance of its own, and the encoding costs one add per key
  (0.45 M parameters in the tiny model, 7% of them).
* The blocks are timm's own ViT blocks (norms, MLP, layer scale, drop path); only the attention is replaced,
  so a softmax DeiT / ViT of the same size shares every other weight (`warm_start_from_softmax`).
* Attention dropout has no attention matrix to act on and is refused; so are PatchDropout (it breaks the
  token grid the depthwise conv needs) and qk-norm (not part of the focused kernel).
* `dynamic_img_size=True` and `dynamic_img_pad=True` by default: the models take any input size, as every
  flatten_* model does (the depthwise conv and the key encoding run on the actual grid; a size that is not a
  multiple of 16 is padded to one, so the grid is ceil(H / 16) x ceil(W / 16)). The position embedding is
  resampled bicubically without antialiasing (`resample_pos_embed`): ONNX's torchscript exporter cannot write
  timm's antialiased resize, and eager and exported models should agree at every size.

No trained weights exist: `pretrained=True` raises timm's error that there are none.
"""
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import register_notrace_function, register_notrace_module, resample_abs_pos_embed, to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.vision_transformer import Block, VisionTransformer

from flatten_timm.layers import FocusedLinearAttention, Mlp
from flatten_timm.layers.parameter_cache import MAX_CACHED_TABLE_ELEMENTS
from flatten_timm.layers.symbolic_shapes import is_exporting
from ._base import check_images
from ._convert import fit_state_dict_to_model, unwrap_state_dict

__all__ = ['FlattenDeit', 'FlattenDeitAttention', 'FlattenDeitBlock', 'WarmStart', 'warm_start_from_softmax']


@register_notrace_module  # the grid is shape arithmetic: a leaf for torch.fx, as its parent
class FlattenDeitAttention(FocusedLinearAttention):
    """ Focused linear attention over `num_prefix_tokens` prefix tokens (the class token) followed by the patch
    tokens of an H x W grid, (B, P + H*W, C) -> (B, P + H*W, C).

    Every token is a query and a key. The depthwise conv of V and the key positional encoding cover the patch
    tokens only; the prefix tokens' rows of both are zero.
    """

    def __init__(self, dim: int, num_heads: int, grid_size: Tuple[int, int], num_prefix_tokens: int = 1, **kwargs):
        # every block attends over all tokens at full width: key encodings kept per block at a large image would
        # outweigh the inference's own memory
        kwargs.setdefault('max_cached_table_elements', MAX_CACHED_TABLE_ELEMENTS)
        super().__init__(dim, num_heads, grid_size=grid_size, **kwargs)
        self.num_prefix_tokens = num_prefix_tokens

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, num_prefix_tokens={self.num_prefix_tokens}'

    def _with_prefix_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H*W, C) rows of the patch tokens -> (B, P + H*W, C), zero rows for the prefix tokens."""
        return F.pad(x, (0, 0, self.num_prefix_tokens, 0)) if self.num_prefix_tokens else x

    def key_positional_encoding(self, key_size: Tuple[int, int]) -> torch.Tensor:
        """The patch keys' encoding on their grid, after a zero row for each prefix token: (1, P + H*W, C)."""
        return self._with_prefix_rows(super().key_positional_encoding(key_size))

    def add_key_encoding(self, k: torch.Tensor, key_size: Tuple[int, int]):
        """Inference: the patch keys' encoding added to the patch keys in place; the prefix keys get none."""
        super().add_key_encoding(k[:, self.num_prefix_tokens:], key_size)

    def local_mixing(self, v: torch.Tensor, feat_size: Tuple[int, int], kernel: Optional[tuple] = None
                     ) -> torch.Tensor:
        """The depthwise conv of the patch tokens' V on their grid, after a zero row for each prefix token."""
        return self._with_prefix_rows(super().local_mixing(v[:, self.num_prefix_tokens:], feat_size, kernel))


class FlattenDeitBlock(Block):
    """ timm's ViT block with FlattenDeitAttention; its forward takes the patch grid as well."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            grid_size: Tuple[int, int] = (14, 14),
            num_prefix_tokens: int = 1,
            focusing_factor: float = 3,
            kernel_size: int = 5,
            attn_impl: str = 'auto',
            qkv_bias: bool = True,
            qk_norm: bool = False,
            scale_attn_norm: bool = False,
            proj_bias: bool = True,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            device=None,
            dtype=None,
            **kwargs,
    ):
        if qk_norm or scale_attn_norm or not proj_bias:
            raise ValueError('FLatten-DeiT attention has no qk_norm / scale_attn_norm and always a projection '
                             'bias; create the model without these options')
        if attn_drop:
            raise ValueError(f'attn_drop_rate={attn_drop}: focused linear attention forms no attention matrix to '
                             f'drop from; use proj_drop_rate or drop_path_rate instead')
        kwargs.pop('attn_layer', None)  # VisionTransformer passes its (softmax) default
        # nn.Identity takes timm's attention arguments and builds nothing: no softmax weights made, then thrown away
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, proj_drop=proj_drop, attn_layer=nn.Identity,
                         device=device, dtype=dtype, **kwargs)
        self.attn = FlattenDeitAttention(
            dim, num_heads, grid_size=grid_size, num_prefix_tokens=num_prefix_tokens, qkv_bias=qkv_bias,
            focusing_factor=focusing_factor, kernel_size=kernel_size, proj_drop=proj_drop, attn_impl=attn_impl,
            device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), feat_size)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


@register_notrace_function  # shape arithmetic: a leaf for torch.fx
def resample_pos_embed(pos_embed: torch.Tensor, new_size, old_size: Tuple[int, int], num_prefix_tokens: int):
    """ The (1, P + h*w, C) position embedding resampled to the new_size grid, bicubic (prefix rows kept).

    As timm's resample_abs_pos_embed but without antialiasing, which ONNX's torchscript exporter cannot write,
    so that eager and exported models agree at every size; and while a graph is recorded the resampling is
    always in it (an identity at old_size), never a same-size shortcut that would fix the graph's size.
    """
    if not is_exporting() and new_size[0] == old_size[0] and new_size[1] == old_size[1]:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    grid = grid.reshape(1, old_size[0], old_size[1], -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_size, mode='bicubic', align_corners=False)
    grid = grid.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1) if num_prefix_tokens else grid


class FlattenDeit(VisionTransformer):
    """ FLatten-DeiT: timm's VisionTransformer whose blocks attend by focused linear attention.

    timm's ViT calls its blocks on tokens alone; the depthwise conv needs the patch grid, so `forward_features`
    and `forward_intermediates` pass it to every block (computed from the input size, as the patch embedding
    does). Everything else (embedding, position embedding, pooling, head, feature info, `set_input_size`,
    `group_matcher`, ...) is timm's.

    Args:
        focusing_factor: the power p of the focusing function.
        kernel_size: kernel of the rank-restoring depthwise conv.
        attn_impl: the focused linear attention's implementation ('auto', 'torch', 'triton', 'reference').
        dynamic_img_size: take any input size (default True).
        dynamic_img_pad: pad images to a multiple of the patch size (default True): the grid covers every pixel.
        **kwargs: VisionTransformer's.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: Union[int, Tuple[int, int]] = 16,
            focusing_factor: float = 3,
            kernel_size: int = 5,
            attn_impl: str = 'auto',
            dynamic_img_size: bool = True,
            dynamic_img_pad: bool = True,
            class_token: bool = True,
            reg_tokens: int = 0,
            patch_drop_rate: float = 0.,
            **kwargs,
    ):
        if patch_drop_rate:
            raise ValueError(f'patch_drop_rate={patch_drop_rate}: dropping patches breaks the patch grid that the '
                             f'depthwise conv of focused linear attention runs on; use drop_path_rate instead')
        if kwargs.get('block_fn') is not None or kwargs.get('attn_layer') is not None:
            raise ValueError('FlattenDeit builds its own blocks and attention (focused linear attention); block_fn '
                             'and attn_layer cannot be set')
        img_size, patch = to_2tuple(img_size), to_2tuple(patch_size)
        grid_size = (img_size[0] // patch[0], img_size[1] // patch[1])
        block_fn = partial(
            FlattenDeitBlock, grid_size=grid_size, num_prefix_tokens=int(class_token) + reg_tokens,
            focusing_factor=focusing_factor, kernel_size=kernel_size, attn_impl=attn_impl)
        kwargs.setdefault('mlp_layer', Mlp)  # timm's Mlp with a fused CPU inference path, same state dict
        super().__init__(img_size=img_size, patch_size=patch_size, dynamic_img_size=dynamic_img_size,
                         dynamic_img_pad=dynamic_img_pad, class_token=class_token, reg_tokens=reg_tokens,
                         block_fn=block_fn, **kwargs)
        self.min_input_size = max(patch)

    @torch.jit.ignore
    def load_pretrained(self, checkpoint_path: str, prefix: str = ''):
        """ Load this project's weights from a .pth / .safetensors file (read without running code from it):
        position tables resampled to the model's grid, a head of another class count left initialised. (timm's
        VisionTransformer reads JAX .npz files here; `scripts/train.py --initial-checkpoint` calls this.)"""
        from flatten_timm.checkpoint import load_checkpoint_file
        self.load_weights(load_checkpoint_file(checkpoint_path))

    def load_weights(self, state_dict: Dict[str, torch.Tensor]):
        """ Load this project's state dict, as the other flatten_* models do (the flatten-timm commands'
        --checkpoint): position tables resampled to the model's grid, a head of another class count left
        initialised, another architecture refused with the mismatches named."""
        from flatten_timm.checkpoint import load_weights_into
        load_weights_into(self, state_dict, filter_fn=checkpoint_filter_fn)

    @torch.jit.ignore
    def no_weight_decay(self):
        # the key positional encodings join ViT's position embedding and tokens
        return super().no_weight_decay() | {
            n for n, _ in self.named_parameters() if n.endswith('attn.positional_encoding')}

    def _embed(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Images -> tokens (prefix tokens first, position embedding added) and the patch grid."""
        check_images(x, self.in_chans, self.min_input_size, type(self).__name__, why='one patch')
        x = self.patch_embed(x)
        # a dynamic-size embedding returns the (B, H, W, C) grid, a fixed-size one the tokens of its own grid
        feat_size = (x.shape[1], x.shape[2]) if self.dynamic_img_size else self.patch_embed.grid_size
        x = self.norm_pre(self.patch_drop(self._pos_embed(x)))
        return x, feat_size

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        # VisionTransformer's, with `resample_pos_embed` (exportable at every size; a leaf for torch.fx)
        if not self.dynamic_img_size or self.pos_embed is None:
            return super()._pos_embed(x)
        B, H, W, C = x.shape
        num_prefix_tokens = 0 if self.no_embed_class else self.num_prefix_tokens
        pos_embed = resample_pos_embed(self.pos_embed, (H, W), self.patch_embed.grid_size, num_prefix_tokens)
        x = x.view(B, -1, C)
        prefix = [t.expand(B, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.no_embed_class:
            x = x + pos_embed
            return self.pos_drop(torch.cat(prefix + [x], dim=1) if prefix else x)
        x = torch.cat(prefix + [x], dim=1) if prefix else x
        return self.pos_drop(x + pos_embed)

    def _run_block(self, block: nn.Module, x: torch.Tensor, feat_size: Tuple[int, int]) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(block, x, feat_size, use_reentrant=False)
        return block(x, feat_size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, feat_size = self._embed(x)
        for block in self.blocks:
            x = self._run_block(block, x, feat_size)
        return self.norm(x)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
            output_dict: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]], Dict[str, Any]]:
        """ Forward features that returns block outputs, as VisionTransformer.forward_intermediates.

        Args:
            indices: take the last n blocks if int, all if None, the listed ones if a sequence.
            return_prefix_tokens: also return the prefix (class) tokens of each intermediate.
            norm: apply the final norm to every intermediate.
            stop_early: stop after the last block needed.
            output_fmt: 'NCHW' (maps at stride patch_size) or 'NLC' (patch tokens).
            intermediates_only: return only the intermediates.
            output_dict: return a dict with 'image_intermediates' (and 'image_intermediates_prefix',
                'image_features').
        """
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        B = x.shape[0]
        x, (H, W) = self._embed(x)
        blocks = self.blocks if torch.jit.is_scripting() or not stop_early else self.blocks[:max_index + 1]
        intermediates = []
        for i, block in enumerate(blocks):
            x = self._run_block(block, x, (H, W))
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)

        P = self.num_prefix_tokens
        prefix_tokens = [y[:, :P] for y in intermediates] if P else None
        intermediates = [y[:, P:] for y in intermediates]
        if output_fmt == 'NCHW':
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]

        if output_dict:
            result = {'image_intermediates': intermediates}
            if prefix_tokens is not None and return_prefix_tokens:
                result['image_intermediates_prefix'] = prefix_tokens
            if not intermediates_only:
                result['image_features'] = self.norm(x)
            return result
        if return_prefix_tokens and prefix_tokens is not None:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def get_intermediate_layers(self, x, n=1, reshape=False, return_prefix_tokens=False, norm=False, **kwargs):
        return self.forward_intermediates(
            x, n, return_prefix_tokens=return_prefix_tokens, norm=norm, output_fmt='NCHW' if reshape else 'NLC',
            intermediates_only=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ---- warm start from softmax weights --------------------------------------------------------------------------

@dataclass
class WarmStart:
    """What `warm_start_from_softmax` did: keys copied from the softmax model, keys focused linear attention adds
    (left at their fresh initialisation), keys resampled (position embedding of another grid) and keys left
    initialised because their shape differs (a head of another class count)."""
    copied: List[str] = field(default_factory=list)
    added: List[str] = field(default_factory=list)
    resampled: List[str] = field(default_factory=list)
    reinitialised: List[str] = field(default_factory=list)


def _pos_embed_on_grid(pos_embed: torch.Tensor, model: FlattenDeit) -> torch.Tensor:
    """A position embedding of another grid resampled to the model's (its prefix rows kept)."""
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    return resample_abs_pos_embed(pos_embed, new_size=model.patch_embed.grid_size, num_prefix_tokens=prefix)


_ADDED_BY_FOCUSED_ATTENTION = ('.attn.dwc.weight', '.attn.dwc.bias', '.attn.scale', '.attn.positional_encoding')


def warm_start_from_softmax(model: FlattenDeit, softmax: Union[nn.Module, Mapping[str, torch.Tensor]]) -> WarmStart:
    """ Initialise a FLatten-DeiT for fine-tuning from a softmax DeiT / ViT of the same width, depth and heads.

    Copies patch embedding, class token, position embedding (resampled if its grid differs), every block's qkv and
    output projections, norms and MLP, the final norm and the head (left initialised if its class count differs).
    What focused linear attention adds (the depthwise conv, the kernel scale, the key positional encodings) keeps
    its fresh initialisation. The result is an initialisation to fine-tune from, not a trained classifier: the
    focused kernel attends differently from the softmax the weights were trained with.

    softmax: a timm `deit_*` / `vit_*` model (not distilled) or its state dict (bare or under 'model' /
    'state_dict'). Returns a `WarmStart` naming the keys copied, added, resampled and re-initialised.
    """
    state_dict = unwrap_state_dict(softmax.state_dict() if isinstance(softmax, nn.Module) else softmax)
    targets = model.state_dict()
    added = [k for k in targets if k.endswith(_ADDED_BY_FOCUSED_ATTENTION)]
    wanted = [k for k in targets if k not in added]
    missing = [k for k in wanted if k not in state_dict]
    unexpected = [k for k in state_dict if k not in targets]
    if missing or unexpected:
        hint = ' (a distilled DeiT has a distillation token and head: use a non-distilled one)' if any(
            'dist' in k for k in unexpected) else ''
        raise ValueError(
            f'the softmax weights do not fit {type(model).__name__}: missing {missing[:6]}'
            f'{" ..." if len(missing) > 6 else ""}, unexpected {unexpected[:6]}{" ..." if len(unexpected) > 6 else ""}'
            f'{hint}. Warm-start from a timm deit_* / vit_* model of the same embed_dim, depth and class token.')

    report = WarmStart(added=added)
    to_load = {}
    for k in wanted:
        v, target = state_dict[k], targets[k]
        if v.shape != target.shape:
            if k == 'pos_embed':
                v = _pos_embed_on_grid(v, model)
                report.resampled.append(k)
            elif k.startswith('head.'):
                report.reinitialised.append(k)
                continue
            else:
                raise ValueError(f'{k} has shape {tuple(v.shape)} in the softmax weights and {tuple(target.shape)} '
                                 f'in {type(model).__name__}: the models differ in size. Warm-start from a softmax '
                                 f'model of the same width ({model.embed_dim} channels), depth and heads')
        else:
            report.copied.append(k)
        to_load[k] = v
    model.load_state_dict(to_load, strict=False)
    return report


# ---- registration -----------------------------------------------------------------------------------------------

def checkpoint_filter_fn(state_dict, model: FlattenDeit):
    """ This project's FLatten-DeiT state dict (bare or under 'model') fitted to the model: position
    embedding and key positional encodings resampled to its grid."""
    state_dict = unwrap_state_dict(state_dict)
    pos_embed = state_dict.get('pos_embed')
    if pos_embed is not None and pos_embed.shape != model.pos_embed.shape:
        state_dict['pos_embed'] = _pos_embed_on_grid(pos_embed, model)
    return fit_state_dict_to_model(state_dict, model)


def _create_flatten_deit(variant: str, pretrained: bool = False, **kwargs) -> FlattenDeit:
    out_indices = kwargs.pop('out_indices', 3)
    return build_model_with_cfg(
        FlattenDeit, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


def _cfg(**kwargs):
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head',
        'paper_ids': 'arXiv:2308.00442',
        'paper_name': 'FLatten Transformer: Vision Transformer using Focused Linear Attention',
        'origin_url': 'https://github.com/LeapLabTHU/FLatten-Transformer',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'flatten_deit_tiny_patch16_224': _cfg(),
    'flatten_deit_small_patch16_224': _cfg(),
    'flatten_deit_base_patch16_224': _cfg(),
})


@register_model
def flatten_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> FlattenDeit:
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_flatten_deit('flatten_deit_tiny_patch16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def flatten_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> FlattenDeit:
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_flatten_deit('flatten_deit_small_patch16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def flatten_deit_base_patch16_224(pretrained: bool = False, **kwargs) -> FlattenDeit:
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_flatten_deit('flatten_deit_base_patch16_224', pretrained=pretrained, **dict(model_args, **kwargs))
