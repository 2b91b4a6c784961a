""" CPU inference through oneDNN's fused primitives: linear + bias (+ GELU), depthwise conv + bias (+ GELU).

PyTorch's eager CPU linear copies the bias into the output, then runs MKL's GEMM over it; the MLP's GELU
is one more pass over the widest activation of the block. oneDNN (the same primitives inductor uses
for CPU inference) adds the bias and the activation in the GEMM's or conv's own epilogue: on a 2-core
x86 that made the linears of these models 1.1-1.6x faster and a depthwise conv + GELU 2x faster.

The fused primitives have no autograd, so they run only where nothing is recorded: a float32 CPU
tensor with autograd off (`torch.no_grad` / `inference_mode`), no autocast, and not while a graph is
exported. Under torch.compile they are opaque custom ops (inductor's own oneDNN fusions need frozen
weights), except with inductor's freezing on, which fuses by itself. Everywhere else these are the plain
torch ops. `FLATTEN_CPU_FUSION=0` (read at import) or `set_cpu_fusion(False)` turns it off; a primitive
that fails falls back to the torch ops for the rest of the run, with one warning. Results equal the torch
ops up to float rounding.
"""
import os
import warnings
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp as _TimmMlp, register_notrace_module
from timm.models.pvt_v2 import MlpWithDepthwiseConv as _TimmMlpWithDepthwiseConv

from .grid_tokens import channels_last_to_tokens, tokens_to_map
from .symbolic_shapes import is_exporting

__all__ = ['CPU_FUSION_ENV', 'Linear', 'Mlp', 'MlpWithDepthwiseConv', 'cpu_fusion_enabled', 'fused_conv2d',
           'fused_linear', 'set_cpu_fusion']

CPU_FUSION_ENV = 'FLATTEN_CPU_FUSION'
_state = {'enabled': os.environ.get(CPU_FUSION_ENV, '1') != '0'}


def set_cpu_fusion(enabled: bool) -> bool:
    """Turn the fused CPU inference path on or off for the process; returns the previous setting."""
    previous, _state['enabled'] = _state['enabled'], bool(enabled)
    return previous


def _onednn_ops() -> dict:
    """oneDNN's fused linear and conv (as inductor calls them), where this build of torch has them."""
    if not torch.backends.mkldnn.is_available():
        return {}
    try:
        return {'linear': torch.ops.mkldnn._linear_pointwise, 'conv2d': torch.ops.mkldnn._convolution_pointwise}
    except (AttributeError, RuntimeError):
        return {}


_ops = _onednn_ops()
_state['available'] = bool(_ops)


def cpu_fusion_enabled(x: torch.Tensor) -> bool:
    """Whether the fused primitives serve `x` now (see the module docstring for when)."""
    return (_state['enabled'] and _state['available'] and x.device.type == 'cpu' and x.dtype == torch.float32
            and not torch.is_grad_enabled() and torch.backends.mkldnn.enabled
            and not torch.is_autocast_enabled('cpu') and not is_exporting() and not _frozen_compile()
            and x.numel() > 0)


def _fusable(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether the fused primitives serve x with these weights: fusion on for x, and weights of x's dtype."""
    return cpu_fusion_enabled(x) and all(w.dtype == x.dtype for w in weights)


def _frozen_compile() -> bool:
    # inductor's freezing fuses plain linears and convs with packed constant weights by itself
    if not torch.compiler.is_compiling():
        return False
    from torch._inductor import config
    return bool(config.freezing)


def _gelu_algorithm(act: nn.Module) -> Optional[str]:
    """oneDNN's name for the GELU `act` computes ('none' is the exact erf form), or None if it is not a GELU."""
    if type(act) is nn.GELU:
        return act.approximate  # 'none' or 'tanh'
    return None


def _activation(attr: str, algorithm: str):
    """The torch op of a oneDNN epilogue (attr 'none', 'relu' or 'gelu' with its approximation)."""
    if attr == 'gelu':
        return lambda x: F.gelu(x, approximate=algorithm)
    return F.relu if attr == 'relu' else lambda x: x


def _failed(error: Exception):
    _state['available'] = False
    warnings.warn(f'oneDNN fused CPU inference failed ({type(error).__name__}: {error}); using the torch ops '
                  f'for the rest of this run', RuntimeWarning, stacklevel=4)


def _linear_primitive(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], attr: str,
                      algorithm: str) -> torch.Tensor:
    # the primitives read weight and bias as dense arrays whatever their strides (a strided bias gives wrong
    # sums, not an error); parameters already are, so .contiguous() costs nothing for them
    weight, bias = weight.contiguous(), bias.contiguous() if bias is not None else None
    if _state['available']:
        try:
            return _ops['linear'](x, weight, bias, attr, [], algorithm)
        except RuntimeError as e:
            _failed(e)
    return _activation(attr, algorithm)(F.linear(x, weight, bias))


def _conv2d_primitive(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], padding: List[int],
                      groups: int, attr: str, algorithm: str) -> torch.Tensor:
    # channels_last in, with the batch stride that makes oneDNN see it so even for a batch of one: channels_last
    # out, the layout the compiled op's fake output declares
    x = tokens_to_map(channels_last_to_tokens(x).contiguous(), x.shape[-2:])
    weight, bias = weight.contiguous(), bias.contiguous() if bias is not None else None
    if _state['available']:
        try:
            return _ops['conv2d'](x, weight, bias, padding, [1, 1], [1, 1], groups, attr, [], algorithm)
        except RuntimeError as e:
            _failed(e)
    out = _activation(attr, algorithm)(F.conv2d(x, weight, bias, padding=tuple(padding), groups=groups))
    return out.contiguous(memory_format=torch.channels_last)


# Under torch.compile the primitives run as opaque custom ops. Inductor lowers oneDNN's own ops only for
# frozen (constant) weights; otherwise it runs addmm after a copy of the bias, and the GELU in a kernel of its
# own. The fake implementations give inductor the outputs' shapes and strides.
_compiled_linear = torch.library.custom_op('flatten_timm::onednn_linear', mutates_args=())(_linear_primitive)
_compiled_conv2d = torch.library.custom_op('flatten_timm::onednn_conv2d', mutates_args=())(_conv2d_primitive)


@_compiled_linear.register_fake
def _(x, weight, bias, attr, algorithm):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@_compiled_conv2d.register_fake
def _(x, weight, bias, padding, groups, attr, algorithm):
    B, _, H, W = x.shape
    k_h, k_w = weight.shape[-2:]
    out = x.new_empty((B, weight.shape[0], H + 2 * padding[0] - k_h + 1, W + 2 * padding[1] - k_w + 1))
    return out.contiguous(memory_format=torch.channels_last)


def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 gelu: Optional[str] = None, relu: bool = False) -> torch.Tensor:
    """F.linear(x, weight, bias), followed by GELU when `gelu` names its approximation ('none' or 'tanh'),
    or by ReLU."""
    attr, algorithm = ('gelu', gelu) if gelu else ('relu', '') if relu else ('none', '')
    if not _fusable(x, weight):
        return _activation(attr, algorithm)(F.linear(x, weight, bias))
    # eager calls the primitive directly: a custom op's dispatch costs more than the smallest linears
    linear = _compiled_linear if torch.compiler.is_compiling() else _linear_primitive
    return linear(x, weight, bias, attr, algorithm)


def fused_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], padding: Sequence[int],
                 groups: int = 1, gelu: Optional[str] = None) -> torch.Tensor:
    """F.conv2d(x, weight, bias, stride 1, padding, groups), followed by GELU when `gelu` names its approximation.
    The fused path returns a channels_last map."""
    attr, algorithm = ('gelu', gelu) if gelu else ('none', '')
    if not _fusable(x, weight):
        return _activation(attr, algorithm)(F.conv2d(x, weight, bias, padding=tuple(padding), groups=groups))
    conv2d = _compiled_conv2d if torch.compiler.is_compiling() else _conv2d_primitive
    return conv2d(x, weight, bias, list(padding), groups, attr, algorithm)


@register_notrace_module  # branches on the grad mode: a leaf for torch.fx
class Linear(nn.Linear):
    """ nn.Linear (same parameters and state dict) that runs through oneDNN in CPU inference."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_linear(x, self.weight, self.bias)


# The fused MLPs run a batch in chunks of whole images whose hidden activation is at most this many bytes. A
# chunk's hidden activation then stays in the last-level cache from fc1 through fc2, and its memory is reused
# from the allocator's heap: a whole batch's (25-50 MB at 224 px, batch 8) is, with glibc's default malloc,
# mapped anew and page-faulted in on every call (1.4 us a 4 KiB page on a 2-core x86). There, FLatten-PVTv2-b0
# at 224 px, batch 8, ran 1.24x faster (about 1.1x with malloc tuned to fault nothing) and FLatten-PVT-T 1.11x.
_MLP_CHUNK_BYTES = 8 * 2 ** 20
# The plain MLP also splits an image whose hidden activation is larger than this into chunks of tokens (of at
# most _MLP_CHUNK_BYTES): glibc maps every block above 32 MiB anew. FLatten-CSWin-T's first-stage MLPs at
# 800x1344 (69 MB each) ran 1.4x faster in the model; a smaller image split (17 MB, its third stage) 3 % slower.
_MLP_SPLIT_IMAGE_BYTES = 32 * 2 ** 20


def _chunk_length(bytes_per_item: int) -> int:
    return max(1, _MLP_CHUNK_BYTES // max(1, bytes_per_item))


def _over_image_chunks(fn, x: torch.Tensor, hidden_features: int) -> torch.Tensor:
    """fn over x split along its batch dim into chunks of whole images with hidden activations of at most
    _MLP_CHUNK_BYTES (one image at least)."""
    step = _chunk_length(x[0].numel() // x.shape[-1] * hidden_features * x.element_size())
    if x.shape[0] <= step:
        return fn(x)
    return torch.cat([fn(chunk) for chunk in x.split(step)])


def _over_token_chunks(fn, x: torch.Tensor, hidden_features: int) -> torch.Tensor:
    """fn (which treats every token alone) over x in chunks of whole images, or, where one image's hidden
    activation exceeds _MLP_SPLIT_IMAGE_BYTES, in chunks of tokens of at most _MLP_CHUNK_BYTES."""
    row_bytes = hidden_features * x.element_size()
    if x[0].numel() // x.shape[-1] * row_bytes <= _MLP_SPLIT_IMAGE_BYTES:
        return _over_image_chunks(fn, x, hidden_features)
    tokens = x.reshape(-1, x.shape[-1])
    return torch.cat([fn(chunk) for chunk in tokens.split(_chunk_length(row_bytes))]).view(*x.shape[:-1], -1)


def _mlp_primitive(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor],
                   fc2_weight: torch.Tensor, fc2_bias: Optional[torch.Tensor], gelu: str) -> torch.Tensor:
    """fc2(GELU(fc1(x))) with fc1 + GELU as one primitive, in cache-sized chunks (`_over_token_chunks`)."""
    def mlp(chunk):
        hidden = _linear_primitive(chunk, fc1_weight, fc1_bias, 'gelu', gelu)
        return _linear_primitive(hidden, fc2_weight, fc2_bias, 'none', '')
    return _over_token_chunks(mlp, x, fc1_weight.shape[0])


def _mlp_dwconv_primitive(x: torch.Tensor, height: int, width: int, fc1_weight: torch.Tensor,
                          fc1_bias: Optional[torch.Tensor], relu: bool, conv_weight: torch.Tensor,
                          conv_bias: Optional[torch.Tensor], padding: List[int], fc2_weight: torch.Tensor,
                          fc2_bias: Optional[torch.Tensor], gelu: str) -> torch.Tensor:
    """PVTv2's MLP on (B, height * width, C) tokens: fc1 (+ ReLU, the "linear" variant's), the depthwise conv
    + GELU as one primitive on the channels_last map the tokens are, fc2; in cache-sized chunks of images."""
    def mlp(chunk):
        hidden = _linear_primitive(chunk, fc1_weight, fc1_bias, 'relu' if relu else 'none', '')
        hidden = _conv2d_primitive(tokens_to_map(hidden, (height, width)), conv_weight, conv_bias, padding,
                                   hidden.shape[-1], 'gelu', gelu)
        return _linear_primitive(channels_last_to_tokens(hidden), fc2_weight, fc2_bias, 'none', '')
    return _over_image_chunks(mlp, x, fc1_weight.shape[0])


# Under torch.compile each fused MLP is one opaque op too: its chunks run inside it (a graph cannot loop over
# a number of tokens that may be a symbol), and inductor could fuse nothing across its primitives anyway.
# Measured with torch.compile on this 2-core CPU, FLatten-PVTv2-b0 at 224 px, batch 8: 1.35-1.6x.
_compiled_mlp = torch.library.custom_op('flatten_timm::onednn_mlp', mutates_args=())(_mlp_primitive)
_compiled_mlp_dwconv = torch.library.custom_op(
    'flatten_timm::onednn_mlp_dwconv', mutates_args=())(_mlp_dwconv_primitive)


@_compiled_mlp.register_fake
def _(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gelu):
    return x.new_empty((*x.shape[:-1], fc2_weight.shape[0]))


@_compiled_mlp_dwconv.register_fake
def _(x, height, width, fc1_weight, fc1_bias, relu, conv_weight, conv_bias, padding, fc2_weight, fc2_bias, gelu):
    return x.new_empty((*x.shape[:-1], fc2_weight.shape[0]))


@register_notrace_module
class Mlp(_TimmMlp):
    """ timm's Mlp (same parameters and state dict); in CPU inference fc1 + GELU is one oneDNN primitive, run
    in cache-sized chunks of images, or of tokens for the largest images."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gelu = _gelu_algorithm(self.act)
        # a model in train() under no_grad still drops out: through timm's own forward
        if (gelu is None or not isinstance(self.norm, nn.Identity) or not _fusable(x, self.fc1.weight, self.fc2.weight)
                or (self.training and (self.drop1.p or self.drop2.p))):
            return super().forward(x)
        mlp = _compiled_mlp if torch.compiler.is_compiling() else _mlp_primitive
        return mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, gelu)


@register_notrace_module
class MlpWithDepthwiseConv(_TimmMlpWithDepthwiseConv):
    """ PVTv2's MLP (timm's, same state dict); in CPU inference the depthwise conv + GELU is one primitive,
    on the channels_last map the tokens already are, and the batch runs in cache-sized chunks of images."""

    def forward(self, x: torch.Tensor, feat_size: List[int]) -> torch.Tensor:
        gelu = _gelu_algorithm(self.act)
        if (gelu is None or not _fusable(x, self.fc1.weight, self.dwconv.weight, self.fc2.weight)
                or (self.training and self.drop.p)):
            return super().forward(x, feat_size)
        mlp = _compiled_mlp_dwconv if torch.compiler.is_compiling() else _mlp_dwconv_primitive
        return mlp(x, feat_size[0], feat_size[1], self.fc1.weight, self.fc1.bias, isinstance(self.relu, nn.ReLU),
                   self.dwconv.weight, self.dwconv.bias, list(self.dwconv.padding), self.fc2.weight,
                   self.fc2.bias, gelu)
