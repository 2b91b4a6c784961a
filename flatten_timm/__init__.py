""" flatten_timm: FLatten Transformer backbones (focused linear attention) as timm models.

Importing this package registers the flatten_* models with timm.
"""
__version__ = '0.1.0'

from . import layers
from . import models
from .layers import FocusedLinearAttention
