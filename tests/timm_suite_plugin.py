""" pytest plugin for running timm's own tests/test_models.py against the flatten_* models.

Imports flatten_timm before timm's test module is collected, so its model lists hold the flatten_*
models, and adds the flatten_* modules to the models timm tests forward_intermediates() and
features_only(feature_cls='getter') on (timm lists those by module name). FLatten-DeiT joins timm's DeiTs
in the group of non-standard models (the `deit*` filter: a class token, no forward_features check, default
cfgs checked by the non-standard test).
"""
import fnmatch

import timm

import flatten_timm  # noqa: F401  registers the models

FLATTEN_MODULES = ['flatten_pvt', 'flatten_pvt_v2', 'flatten_swin', 'flatten_cswin', 'flatten_deit']
NON_STANDARD = 'flatten_deit*'  # timm's own filter for these is 'deit*'
_list_models = timm.list_models


def _as_list(filters):
    return list(filters) if isinstance(filters, (list, tuple)) else [filters] if filters else []


def list_models(filter='', module='', exclude_filters='', **kwargs):
    names = _list_models(filter, module=module, exclude_filters=exclude_filters, **kwargs)
    if isinstance(module, (list, tuple)) and 'swin_transformer' in module:  # timm's forward_intermediates set
        names = sorted(set(names) | set(_list_models(filter, module=FLATTEN_MODULES, exclude_filters=exclude_filters,
                                                     **kwargs)))
    if 'deit*' in _as_list(filter):
        names = sorted(set(names) | set(_list_models(NON_STANDARD, **kwargs)))
    if 'deit*' in _as_list(exclude_filters):
        names = [n for n in names if not fnmatch.fnmatch(n, NON_STANDARD)]
    return names


timm.list_models = list_models
