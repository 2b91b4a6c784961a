""" What every flatten_* model shares: input checks and the timm model API over `patch_embed -> stages -> norm`.

A family provides `patch_embed`, `stages` (nn.Sequential; each stage has `grad_checkpointing` and
`blocks`), `norm`, `head`, `head_drop`, `feature_info`, a `checkpoint_filter` method (its module's
`checkpoint_filter_fn`), and sets `output_fmt` to the layout its stages pass along ('NCHW' or 'NHWC').
The pyramid families (PVT, PVTv2, CSWin) build their stages with `pyramid_stages`.
"""
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from timm.layers import get_device_dtype, register_notrace_function, register_notrace_module, trunc_normal_
from timm.models import build_model_with_cfg
from timm.models._features import feature_take_indices

from flatten_timm.layers import GridTableResizer, map_to_tokens, tokens_to_map

__all__ = ['FlattenModel', 'PyramidStage', 'build_flatten_model', 'init_weights', 'pyramid_stages',
           'resolve_stage_args', 'stage_drop_path_rates', 'stage_reduction']


def resolve_stage_args(name: str, value, num_stages: int) -> tuple:
    """A per-stage hyper-parameter given as one value or a sequence (a string like 'LLSS' counts as a sequence)."""
    if isinstance(value, (list, tuple, str)):
        if len(value) != num_stages:
            raise ValueError(f'{name} needs {num_stages} values, one per stage, got {value!r}')
        return tuple(value)
    return (value,) * num_stages


def stage_reduction(index: int) -> int:
    """Stride of stage `index` of the four-stage pyramid: 4, 8, 16, 32."""
    return 4 * 2 ** index


def stage_drop_path_rates(drop_path_rate: float, depths: Sequence[int]):
    """Stochastic depth rising linearly over all blocks, split per stage."""
    rates = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
    return [rates[sum(depths[:i]):sum(depths[:i + 1])] for i in range(len(depths))]


@register_notrace_module  # shape-dependent control flow (grids, windows, padding): a leaf for torch.fx
class PyramidStage(nn.Module):
    """ One pyramid stage, NCHW in and out: optional downsampling embed, optional absolute position
    embedding (PVT v1), blocks of `block_fn(dim, grid_size=..., drop_path=..., norm_layer=..., **block_kwargs)`
    on tokens, optional norm (PVTv2)."""

    def __init__(
            self,
            block_fn: Callable[..., nn.Module],
            dim: int,
            depth: int,
            grid_size: Tuple[int, int],
            downsample: Optional[nn.Module] = None,
            pos_embed: bool = False,
            stage_norm: bool = False,
            drop_rate: float = 0.,
            drop_path: Sequence[float] = (),
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            device=None,
            dtype=None,
            **block_kwargs,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.grad_checkpointing = False
        self.grid_size = tuple(grid_size)
        self.downsample = downsample
        if pos_embed:
            self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], dim, **dd))
            self.pos_drop = nn.Dropout(drop_rate)
            self._resize_pos_embed = GridTableResizer(self.grid_size)
        else:
            self.pos_embed = None
        drop_path = list(drop_path) or [0.] * depth
        self.blocks = nn.ModuleList([
            block_fn(dim, grid_size=grid_size, drop_path=drop_path[i], norm_layer=norm_layer, **block_kwargs, **dd)
            for i in range(depth)])
        self.norm = norm_layer(dim, **dd) if stage_norm else nn.Identity()

    def _apply(self, fn, *args, **kwargs):
        if self.pos_embed is not None:  # a move frees storages whose addresses the next ones may reuse
            self._resize_pos_embed.clear()
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        feat_size = (x.shape[-2], x.shape[-1])
        x = map_to_tokens(x)
        if self.pos_embed is not None:
            x = self.pos_drop(x + self._resize_pos_embed(self.pos_embed, feat_size))
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x, feat_size, use_reentrant=False)
            else:
                x = blk(x, feat_size)
        return tokens_to_map(self.norm(x), feat_size)


def pyramid_stages(
        block_fn: Callable[..., nn.Module],
        embed_dims: Sequence[int],
        depths: Sequence[int],
        img_size: Tuple[int, int],
        drop_path_rate: float,
        downsample_fn: Callable[[int, int], nn.Module],
        stage_args: Dict[str, Sequence],
        **kwargs,
) -> List[PyramidStage]:
    """ The PyramidStages of a four-stage pyramid (PVT, PVTv2, CSWin).

    Stage i runs `depths[i]` blocks of `embed_dims[i]` channels on the training grid of stride
    stage_reduction(i); stages after the first start with `downsample_fn(in_dim, out_dim)`. `stage_args`
    gives block arguments one value per stage; `kwargs` go to every stage (PyramidStage's and the blocks').
    """
    dpr = stage_drop_path_rates(drop_path_rate, depths)
    stages = []
    for i, (dim, depth) in enumerate(zip(embed_dims, depths)):
        reduction = stage_reduction(i)
        stages.append(PyramidStage(
            block_fn,
            dim,
            depth=depth,
            grid_size=(img_size[0] // reduction, img_size[1] // reduction),
            downsample=None if i == 0 else downsample_fn(embed_dims[i - 1], dim),
            drop_path=dpr[i],
            **{name: values[i] for name, values in stage_args.items()},
            **kwargs,
        ))
    return stages


def init_weights(m: nn.Module):
    """The official initialisation: truncated-normal linear weights, zero biases, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


@register_notrace_function  # checks on shapes: a leaf for torch.fx, as timm does with its own
def check_images(x: torch.Tensor, in_chans: int, min_size: int, name: str, why: str = 'it downsamples by 32'):
    """A clear error for input the model cannot take; `why` says where its smallest size comes from."""
    if x.ndim != 4:
        raise ValueError(
            f'{name} expects a batch of images shaped (batch, channels, height, width); got a tensor of '
            f'shape {tuple(x.shape)}. Add a batch dimension with x.unsqueeze(0) for a single image.')
    if x.shape[1] != in_chans:
        raise ValueError(
            f'{name} expects {in_chans} input channels but got {x.shape[1]} (input shape '
            f'{tuple(x.shape)}). Convert the images to {in_chans} channels, or create the model with '
            f'in_chans={x.shape[1]}.')
    if min(x.shape[-2:]) < min_size:
        raise ValueError(
            f'{name} needs images of at least {min_size}x{min_size} pixels ({why}); got '
            f'{x.shape[-2]}x{x.shape[-1]}. Resize or pad the input.')


@register_notrace_function
def prepare_images(x: torch.Tensor, in_chans: int, min_size: int, name: str) -> torch.Tensor:
    """`check_images`, then the batch in channels_last memory."""
    check_images(x, in_chans, min_size, name)
    # channels_last from the stem on: token layouts are NHWC, so every conv (embeddings, depthwise convs)
    # then reads and writes its map in place, and convs run several times faster than on NCHW on CPU
    return x.contiguous(memory_format=torch.channels_last)


class FlattenModel(nn.Module):
    output_fmt: str = 'NCHW'
    min_input_size: int = 32

    def _init_common(self, in_chans: int, num_classes: int, global_pool: str):
        if global_pool not in ('avg', ''):
            raise ValueError(f"global_pool must be 'avg' or '' (none), got {global_pool!r}")
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool

    def _init_stages(self, stages: List[nn.Module], embed_dims: Sequence[int]):
        """The stages as `self.stages`, and their feature_info (stage i at stride stage_reduction(i))."""
        self.stages = nn.Sequential(*stages)
        self.feature_info = [dict(num_chs=dim, reduction=stage_reduction(i), module=f'stages.{i}')
                             for i, dim in enumerate(embed_dims)]

    def _init_head(self, num_features: int, drop_rate: float, **dd):
        self.num_features = self.head_hidden_size = num_features
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(num_features, self.num_classes, **dd) if self.num_classes > 0 else nn.Identity()

    # ---- input validation -------------------------------------------------------------------
    def _prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        name = self.pretrained_cfg.get('architecture') if getattr(self, 'pretrained_cfg', None) else None
        return prepare_images(x, self.in_chans, self.min_input_size, name or type(self).__name__)

    # ---- weights ----------------------------------------------------------------------------
    @torch.jit.ignore
    def load_pretrained(self, path: str, key: Optional[str] = None):
        """ Load weights from a file: an official FLatten checkpoint (converted on load, read without
        running code from it), or this project's .pth / .safetensors. timm calls this for
        `pretrained=True` (custom_load), with the file or the downloaded official checkpoint.
        """
        from flatten_timm.checkpoint import load_checkpoint_file
        self.load_weights(load_checkpoint_file(path, key))

    def load_weights(self, state_dict: Dict[str, torch.Tensor]):
        """ Load an official or this project's state dict: keys converted by `checkpoint_filter`, position
        tables resized, a head of another class count left re-initialised.
        """
        from flatten_timm.checkpoint import load_weights_into
        load_weights_into(self, self.checkpoint_filter(state_dict))

    def checkpoint_filter(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """An official or this project's state dict in this model's layout: each family returns its
        module's `checkpoint_filter_fn(state_dict, self)`."""
        raise NotImplementedError(f'{type(self).__name__} does not define checkpoint_filter')

    # ---- timm model API ---------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        return dict(
            stem=r'^patch_embed',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.downsample', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^stages\.(\d+)\.(?:norm|pos_embed)', (99999,)),
                (r'^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        self.num_classes = num_classes
        if global_pool is not None:
            self._init_common(self.in_chans, num_classes, global_pool)
        self.head = nn.Linear(self.num_features, num_classes, **get_device_dtype(self)) \
            if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def _to_nchw(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2) if self.output_fmt == 'NHWC' else x

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """ Forward features that returns intermediates (stage outputs).

        Args:
            x: input images (B, C, H, W), any size of at least `min_input_size`.
            indices: take the last n stages if int, all if None, the listed ones if a sequence.
            norm: apply the final norm to the last stage's output when it is taken.
            stop_early: stop after the last stage needed.
            output_fmt: 'NCHW' or 'NHWC' for the intermediates.
            intermediates_only: return only the intermediates.
        """
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_index = len(self.stages) - 1
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index + 1]

        intermediates = []
        x = self.patch_embed(self._prepare_input(x))
        for stage_index, stage in enumerate(stages):
            x = stage(x)
            if stage_index in take_indices:
                x_inter = self.norm(x) if norm and stage_index == last_index else x
                x_inter = self._to_nchw(x_inter)
                intermediates.append(x_inter.permute(0, 2, 3, 1) if output_fmt == 'NHWC' else x_inter.contiguous())

        if intermediates_only:
            return intermediates
        if len(stages) == len(self.stages):
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ):
        """ Drop the stages (and optionally norm and head) not needed for the given intermediates."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(self._prepare_input(x))
        x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x.mean(dim=(1, 2) if self.output_fmt == 'NHWC' else (2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build_flatten_model(model_cls, variant: str, pretrained: bool, pretrained_filter_fn: Callable, **kwargs):
    """ timm's build_model_with_cfg, with weights always read by FlattenModel.load_pretrained.

    timm resets `custom_load` when a user overlays a `file` or `url`; official checkpoints need the
    safe loader and key conversion for those too, so they are kept on it here.
    """
    overlay = kwargs.get('pretrained_cfg_overlay')
    if overlay and (overlay.get('file') or overlay.get('url')) and 'custom_load' not in overlay:
        kwargs['pretrained_cfg_overlay'] = dict(overlay, custom_load=True)
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    try:
        return build_model_with_cfg(
            model_cls,
            variant,
            pretrained,
            pretrained_filter_fn=pretrained_filter_fn,
            feature_cfg=dict(feature_cls='getter', out_indices=out_indices),
            **kwargs,
        )
    except OSError as e:  # a failed download: one error naming the model, the URL and what to do offline
        from flatten_timm.hub import weights_download_error
        error = weights_download_error(variant, kwargs, e) if pretrained else None
        if error is None:
            raise
        raise error from None
