""" pytest plugin for running timm's own tests/test_models.py against the flatten_* models.

Imports flatten_timm before timm's test module is collected, so its model lists hold the flatten_*
models, and adds the flatten_* modules to the models timm tests forward_intermediates() and
features_only(feature_cls='getter') on (timm lists those by module name).
"""
import timm

import flatten_timm  # noqa: F401  registers the models

FLATTEN_MODULES = ['flatten_pvt', 'flatten_pvt_v2', 'flatten_swin', 'flatten_cswin']
_list_models = timm.list_models


def list_models(*args, module='', **kwargs):
    names = _list_models(*args, module=module, **kwargs)
    if isinstance(module, (list, tuple)) and 'swin_transformer' in module:  # timm's forward_intermediates set
        names = sorted(set(names) | set(_list_models(*args, module=FLATTEN_MODULES, **kwargs)))
    return names


timm.list_models = list_models
