""" FLatten models in detectors: a torchvision FPN backbone, and a C2f-style neck block with focused attention.

    from torchvision.models.detection import FasterRCNN
    backbone = FlattenFPNBackbone('flatten_pvt_v2_b2', pretrained=True)
    detector = FasterRCNN(backbone, num_classes=91)

Any input size works: the stage maps are at strides 4, 8, 16, 32 of the padded input, as
torchvision's detection transforms expect.
"""
from collections import OrderedDict
from typing import Dict, Sequence, Tuple

import timm
import torch
import torch.nn as nn
from timm.layers import ConvNormAct

from .layers import FocusedLinearAttention2d

__all__ = ['FlattenFPNBackbone', 'FocusedAttentionBottleneck', 'C2fFocusedAttention']


class FlattenFPNBackbone(nn.Module):
    """ A flatten_* model's stage maps (features_only) under torchvision's FeaturePyramidNetwork.

    Has the `out_channels` attribute torchvision's FasterRCNN / RetinaNet / MaskRCNN read. Returns an
    OrderedDict '0'..'3' (strides 4..32), plus 'pool' (stride 64) when extra_max_pool is set, which
    matches the anchor generators and RoI poolers of torchvision's defaults.

    Args:
        model_name: a flatten_* model (or any timm model with features_only).
        out_indices: stages to use.
        fpn_channels: channels of every pyramid level.
        extra_max_pool: add the max-pooled 'pool' level (FasterRCNN default); RetinaNet wants
            P6/P7 instead, pass `extra_blocks` for that.
        pretrained, **model_kwargs: passed to timm.create_model.
    """

    def __init__(
            self,
            model_name: str,
            out_indices: Sequence[int] = (0, 1, 2, 3),
            fpn_channels: int = 256,
            pretrained: bool = False,
            extra_max_pool: bool = True,
            extra_blocks: nn.Module = None,
            **model_kwargs,
    ):
        super().__init__()
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
        self.body = timm.create_model(
            model_name, pretrained=pretrained, features_only=True, out_indices=tuple(out_indices), **model_kwargs)
        if extra_blocks is None and extra_max_pool:
            extra_blocks = LastLevelMaxPool()
        self.fpn = FeaturePyramidNetwork(self.body.feature_info.channels(), fpn_channels, extra_blocks=extra_blocks)
        self.out_channels = fpn_channels

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))


class FocusedAttentionBottleneck(nn.Module):
    """ x + FocusedLinearAttention2d(x), then x + a 1x1-conv feed-forward: a transformer block in conv layout."""

    def __init__(self, channels: int, num_heads: int, grid_size: Tuple[int, int], ffn_ratio: float = 2.,
                 **attn_kwargs):
        super().__init__()
        self.attn = FocusedLinearAttention2d(channels, num_heads=num_heads, grid_size=grid_size, **attn_kwargs)
        hidden = int(channels * ffn_ratio)
        self.ffn = nn.Sequential(
            ConvNormAct(channels, hidden, 1, act_layer=nn.SiLU),
            ConvNormAct(hidden, channels, 1, apply_act=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.ffn(x)


class C2fFocusedAttention(nn.Module):
    """ A YOLOv8 C2f-style block whose bottlenecks are focused-attention blocks (plain torch layers).

    1x1 conv to 2c channels, split in two; n bottlenecks run on the second half, each output kept;
    all parts concatenated and fused by a 1x1 conv. (B, in_chs, H, W) -> (B, out_chs, H, W).
    """

    def __init__(self, in_chs: int, out_chs: int, n: int = 1, num_heads: int = 4,
                 grid_size: Tuple[int, int] = (20, 20), expansion: float = 0.5, **attn_kwargs):
        super().__init__()
        self.hidden = int(out_chs * expansion)
        self.conv_in = ConvNormAct(in_chs, 2 * self.hidden, 1, act_layer=nn.SiLU)
        self.blocks = nn.ModuleList(
            FocusedAttentionBottleneck(self.hidden, num_heads, grid_size, **attn_kwargs) for _ in range(n))
        self.conv_out = ConvNormAct((2 + n) * self.hidden, out_chs, 1, act_layer=nn.SiLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = list(self.conv_in(x).chunk(2, dim=1))
        for block in self.blocks:
            parts.append(block(parts[-1]))
        return self.conv_out(torch.cat(parts, dim=1))
