from .fla import (
    ATTN_IMPLS, FocusedLinearAttention, FocusedLinearAttention2d, focused_linear_attention, focusing_map,
    linear_attention, run_focused_linear_attention, set_attn_impl)
from .grid_tokens import (
    GridTableResizer, channels_last_to_tokens, map_to_tokens, merge_windows, pad_nhwc, partition_windows,
    resample_grid_tokens, tokens_to_channels_last, tokens_to_map, windows_as_map)
from .softmax_attention import softmax_attention
from .spatial_reduction import SpatialReduction, SpatialReductionAttention
from .conv_embed import ConvEmbed, PatchEmbed
from .fused_inference import (
    Linear, Mlp, MlpWithDepthwiseConv, cpu_fusion_enabled, fused_conv2d, fused_linear, set_cpu_fusion)
