""" Checkpoint files as models: what they were trained with, conversion into timm Hub folders, uploads.

A checkpoint this project writes says how its model is used: `scripts/train.py` stores the
`pretrained_cfg` it trained with (input size, crop, interpolation, mean/std, class count and names)
and the `model_args` that rebuild the model (e.g. `img_size`) beside the weights, and a converted Hub
folder keeps them in its `config.json`, as timm does. `create_model_as_trained` builds the model that
way (at its training size, with its class names) unless told otherwise.

A converted folder holds `model.safetensors` (this project's key layout), timm's `config.json`
(architecture, num_classes, pretrained_cfg, model_args) and a model card, so that
`timm.create_model('hf-hub:OWNER/NAME', pretrained=True)` loads it once flatten_timm is imported.
"""
import dataclasses
import json
import logging
import os
import urllib.error
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from timm.models import save_for_hf

from .zoo import RELEASED_TOP1

_logger = logging.getLogger(__name__)

__all__ = ['PretrainedWeightsUnavailable', 'convert_checkpoint', 'create_model_as_trained', 'load_checkpoint_config',
           'model_kwargs_from_config', 'push_folder_to_hub', 'model_card', 'weights_download_error']

# pretrained_cfg entries that name where released weights come from: a trained checkpoint is its own source
_SOURCE_KEYS = ('url', 'file', 'state_dict', 'hf_hub_id', 'hf_hub_filename', 'source', 'custom_load')


def _pretrained_cfg_fields() -> set:
    from timm.models._pretrained import PretrainedCfg
    return {f.name for f in dataclasses.fields(PretrainedCfg)}


def load_checkpoint_config(path: Union[str, Path]) -> Dict[str, Any]:
    """ What a checkpoint file says about the model it holds, {} when it says nothing.

    Keys (each only when known): 'architecture'; 'pretrained_cfg', the data settings it was trained with
    (input_size, crop_pct, crop_mode, interpolation, mean, std, num_classes, label_names); 'model_args',
    create_model keywords that rebuild it (img_size, ...); 'dataset', what it was trained on.

    `scripts/train.py` checkpoints carry them as entries; a `.safetensors` file of a timm Hub folder takes
    them from the `config.json` beside it. Official checkpoints and bare state dicts carry none. Nothing in
    the file is executed: only tensors and plain values are read (`weights_only`), and the weights are
    mapped, not read.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        return {}
    if path.endswith('.safetensors'):
        config_path = os.path.join(os.path.dirname(path), 'config.json')
        try:
            with open(config_path, encoding='utf-8') as f:
                raw = json.load(f)
        except (OSError, ValueError):
            return {}
    else:
        try:
            raw = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
        except Exception:  # official training checkpoints hold other objects (a yacs config): no config there
            return {}
    if not isinstance(raw, Mapping):
        return {}
    config = {k: dict(raw[k]) for k in ('pretrained_cfg', 'model_args') if isinstance(raw.get(k), Mapping)}
    if not config:
        return {}
    architecture = raw.get('architecture') or raw.get('arch') or config.get('pretrained_cfg', {}).get('architecture')
    if isinstance(architecture, str):
        config['architecture'] = architecture
    if isinstance(raw.get('dataset'), str) and raw['dataset']:
        config['dataset'] = raw['dataset']
    return config


def model_kwargs_from_config(model_name: str, config: Dict[str, Any], kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """kwargs for create_model: the checkpoint's model_args and pretrained_cfg, under what the caller gives."""
    architecture = config.get('architecture')
    if not config or (architecture and architecture != model_name.split('.')[0]):
        return kwargs  # not this model's config: loading the weights will say what does not fit
    kwargs = dict(kwargs)
    explicit_size = kwargs.get('img_size')
    for key, value in config.get('model_args', {}).items():
        kwargs.setdefault(key, tuple(value) if isinstance(value, list) else value)
    fields = _pretrained_cfg_fields() - set(_SOURCE_KEYS) - {'architecture'}
    overlay = {k: tuple(v) if isinstance(v, list) and k != 'label_names' else v  # JSON has lists for tuples
               for k, v in config.get('pretrained_cfg', {}).items() if k in fields}
    # a trained checkpoint is not the released weights its architecture's default tag names
    overlay.update(tag=None, url='')
    if explicit_size is not None:  # evaluated at another size than it was trained at, on purpose
        size = (explicit_size,) * 2 if isinstance(explicit_size, int) else tuple(explicit_size)
        overlay['input_size'] = (overlay.get('input_size', (3,))[0], *size)
    if 'input_size' in overlay:  # the final map of every family is at stride 32
        overlay['pool_size'] = tuple(-(-s // 32) for s in overlay['input_size'][-2:])
    overlay.update(kwargs.get('pretrained_cfg_overlay') or {})
    kwargs['pretrained_cfg_overlay'] = overlay
    return kwargs


def create_model_as_trained(model_name: str, checkpoint: Union[str, Path], key: Optional[str] = None, **kwargs):
    """ The model of a checkpoint file with its weights, built and configured as the file says it was trained.

    Like `flatten_timm.checkpoint.create_model_from_checkpoint` (official or this project's files, read
    safely, the class count from the classifier), plus the file's own config (`load_checkpoint_config`):
    its `model_args` (e.g. `img_size`) build the model, its `pretrained_cfg` becomes the model's, so
    `timm.data.resolve_data_config({}, model=model)` gives its input size, crop and mean/std, and
    `model.pretrained_cfg['label_names']` its class names. Keywords given here win over the file's.
    """
    from .checkpoint import create_model_from_checkpoint
    kwargs = model_kwargs_from_config(model_name, load_checkpoint_config(checkpoint), kwargs)
    return create_model_from_checkpoint(model_name, os.fspath(checkpoint), key, **kwargs)


class PretrainedWeightsUnavailable(urllib.error.URLError):
    """ The pretrained weights of a model could not be downloaded (no network, a blocked or moved URL).

    A URLError, as the download's own error is; `reason` is that error's reason, and the message names the
    model, where its weights come from and what to do without a network.
    """

    def __init__(self, message: str, reason):
        super().__init__(reason)
        self.message = message

    def __str__(self):
        return self.message


def _is_download_failure(error: BaseException) -> bool:
    if isinstance(error, (urllib.error.URLError, ConnectionError, TimeoutError)):
        return True
    try:
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        return False
    return isinstance(error, (HfHubHTTPError, LocalEntryNotFoundError))


def weights_download_error(variant: str, kwargs: Dict[str, Any], error: BaseException
                           ) -> Optional[PretrainedWeightsUnavailable]:
    """ One readable error for a failed download of `variant`'s pretrained weights, or None if `error` is not one.

    kwargs are the create_model keywords (pretrained_cfg, pretrained_cfg_overlay), to name the weights' source.
    """
    if not _is_download_failure(error):
        return None
    from timm.models._builder import resolve_pretrained_cfg
    try:
        cfg = resolve_pretrained_cfg(variant, pretrained_cfg=kwargs.get('pretrained_cfg'),
                                     pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
        name = f'{variant}.{cfg.tag}' if cfg.tag else variant
        url, file_name = cfg.url if isinstance(cfg.url, (tuple, list)) else (cfg.url, None)
        # timm prefers a Hub copy to the URL when both are set
        source = f'the Hugging Face Hub ({cfg.hf_hub_id})' if cfg.hf_hub_id else (url or 'its source')
    except Exception:  # naming the source is a courtesy; the download failure is what matters
        name, source, file_name = variant, 'its source', None
    reason = getattr(error, 'reason', None) or error
    file_name = file_name or f'{variant}.pth'
    message = (
        f'could not download the weights of {name} from {source} ({type(error).__name__}: {reason}). '
        f'Without a network, download the file elsewhere and load it from disk: '
        f"timm.create_model('{variant}', pretrained=True, pretrained_cfg_overlay=dict(file='{file_name}')) "
        f'(the flatten-timm commands and scripts: --checkpoint {file_name}). Weights from the Hugging Face Hub '
        f'that were downloaded once load from its cache with HF_HUB_OFFLINE=1.')
    return PretrainedWeightsUnavailable(message, reason)

# The official repository publishes no license for its code or weights.
DEFAULT_LICENSE = 'other'

CITATION = """@InProceedings{han2023flatten,
  title={FLatten Transformer: Vision Transformer using Focused Linear Attention},
  author={Han, Dongchen and Pan, Xuran and Han, Yizeng and Song, Shiji and Huang, Gao},
  booktitle={Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
  year={2023}
}"""


def _training_lines(model, trained: bool, dataset: Optional[str]) -> list:
    """The model card's lines on the data: ImageNet-1k for the released layout, else what the checkpoint says."""
    if not trained:
        return ['- **Training data:** ImageNet-1k (official release)' if model.num_classes == 1000 else
                '- **Training data:** not recorded in the checkpoint']
    names = model.pretrained_cfg.get('label_names') or []
    shown = ', '.join(map(str, names[:20])) + (', ...' if len(names) > 20 else '')
    return [f'- **Training data:** {dataset or "not recorded in the checkpoint"}'] + (
        [f'- **Class names:** {shown}'] if names else [])


def model_card(model, repo_name: str, license: str = DEFAULT_LICENSE, source: str = '', trained: bool = False,
               dataset: Optional[str] = None) -> str:
    """ A Hub model card (README.md with YAML metadata) for a converted FLatten checkpoint.

    trained: the checkpoint was trained by this project (it carries its config), so the paper's accuracy
    and ImageNet-1k are not claimed for it; dataset: what it was trained on, when known.
    """
    arch = model.pretrained_cfg['architecture']
    input_size = model.pretrained_cfg['input_size']
    released = not trained and model.num_classes == 1000
    top1 = RELEASED_TOP1.get(arch) if released else None
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    license_note = (
        'The official repository (LeapLabTHU/FLatten-Transformer) states no license for its code or '
        'weights; ask the authors before using these weights commercially.'
        if license == DEFAULT_LICENSE else f'License: {license}.')
    lines = [
        '---',
        'tags:', '- image-classification', '- timm', '- flatten_timm',
        'library_name: timm',
        f'license: {license}',
        *(['datasets:', '- imagenet-1k'] if released else []),
        '---',
        f'# {repo_name}',
        '',
        f'FLatten Transformer `{arch}` (focused linear attention) in timm format, converted with flatten_timm'
        + (f' from `{source}`' if source else '') + '.',
        '',
        '## Model details',
        f'- **Architecture:** {arch}',
        f'- **Params (M):** {params_m:.2f}',
        f'- **Image size:** {input_size[1]} x {input_size[2]}',
        f'- **Classes:** {model.num_classes}',
        *_training_lines(model, trained, dataset),
        f'- **ImageNet-1k top-1 (paper / official release):** {top1:.1f}%' if top1 is not None else
        '- **ImageNet-1k top-1:** not reported for this checkpoint',
        '- **Paper:** FLatten Transformer: Vision Transformer using Focused Linear Attention, '
        'ICCV 2023, https://arxiv.org/abs/2308.00442',
        '- **Original code and weights:** https://github.com/LeapLabTHU/FLatten-Transformer',
        f'- **License:** {license_note}',
        '',
        '## Usage',
        '```python',
        'import timm, flatten_timm  # importing flatten_timm registers the FLatten models',
        f"model = timm.create_model('hf-hub:{repo_name}', pretrained=True).eval()",
        'cfg = timm.data.resolve_data_config({}, model=model)',
        'transform = timm.data.create_transform(**cfg)',
        '```',
        '',
        '## Citation',
        '```bibtex',
        CITATION,
        '```',
        '',
    ]
    return '\n'.join(lines)


def convert_checkpoint(
        model_name: str,
        checkpoint: Union[str, Path],
        output_dir: Union[str, Path],
        key: Optional[str] = None,
        repo_name: Optional[str] = None,
        license: str = DEFAULT_LICENSE,
        **model_kwargs,
) -> Path:
    """ Convert an official (or this project's) checkpoint into a timm Hub folder.

    The checkpoint is read with the safe loader and converted by the family's checkpoint_filter_fn;
    the model takes the checkpoint's class count, and the input size, crop and class names of a checkpoint
    that records them (`load_checkpoint_config`).

    model_kwargs (e.g. img_size, depths) are recorded in config.json, so the Hub copy rebuilds the same model.
    Returns the output folder, holding model.safetensors, config.json and README.md.
    """
    config = load_checkpoint_config(checkpoint)
    model = create_model_as_trained(model_name, checkpoint, key, **model_kwargs)

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_for_hf(model.eval(), output_dir, safe_serialization=True)
    card = model_card(model, repo_name or output_dir.name, license=license, source=Path(checkpoint).name,
                      trained=bool(config), dataset=config.get('dataset'))
    (output_dir / 'README.md').write_text(card, encoding='utf-8')
    _logger.info(f'{model_name}: wrote {output_dir} (model.safetensors, config.json, README.md)')
    return output_dir


def push_folder_to_hub(folder: Union[str, Path], repo_id: str, private: bool = False,
                       token: Optional[str] = None, commit_message: str = 'Add FLatten weights') -> str:
    """Upload a converted folder to the Hugging Face Hub (creating the repository if needed); returns its URL."""
    from huggingface_hub import HfApi
    api = HfApi(token=token, library_name='flatten_timm')
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    return f'{api.endpoint}/{repo_id}'
