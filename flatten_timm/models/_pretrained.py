""" Pretrained cfgs of the flatten_* models, shared by every family.

`default_cfg` is a model's cfg (data settings, where its weights load, the paper); `official_cfg` adds the
download link of a checkpoint the FLatten authors released.
"""
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

__all__ = ['default_cfg', 'official_cfg']


def default_cfg(url: str = '', **kwargs):
    return {
        'url': url, 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'crop_mode': 'squash', 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head',
        # weights load through FlattenModel.load_pretrained: safe unpickling and official-key conversion
        'custom_load': True,
        'paper_ids': 'arXiv:2308.00442',
        'paper_name': 'FLatten Transformer: Vision Transformer using Focused Linear Attention',
        'origin_url': 'https://github.com/LeapLabTHU/FLatten-Transformer',
        **kwargs,
    }


def official_cfg(file_id: str, filename: str, **kwargs):
    """A released checkpoint: the official download link (its URL has no file name, so give one)."""
    return default_cfg(url=(f'https://cloud.tsinghua.edu.cn/f/{file_id}/?dl=1', filename), **kwargs)
