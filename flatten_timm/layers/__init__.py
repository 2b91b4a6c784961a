from .focused_linear_attention import FocusedLinearAttention, focusing_map, linear_attention, resample_grid_tokens
from .spatial_reduction import SpatialReduction, SpatialReductionAttention, tokens_to_map, map_to_tokens
from .conv_embed import ConvEmbed
