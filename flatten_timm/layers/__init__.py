from .focused_linear_attention import FocusedLinearAttention, FocusedLinearAttention2d, focusing_map, linear_attention
from .grid_tokens import GridTableResizer, map_to_tokens, resample_grid_tokens, tokens_to_map
from .spatial_reduction import SpatialReduction, SpatialReductionAttention
from .conv_embed import ConvEmbed
