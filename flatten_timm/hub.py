""" Checkpoint files as models: what they were trained with, conversion into timm Hub folders, uploads.

A checkpoint this project writes says how its model is used: `scripts/train.py` stores the
`pretrained_cfg` it trained with (input size, crop, interpolation, mean/std, class count and names)
and the `model_args` that rebuild the model (e.g. `img_size`) beside the weights, and a converted Hub
folder keeps them in its `config.json`, as timm does. `create_model_as_trained` builds the model that
way (at its training size, with its class names) unless told otherwise.

A converted folder holds `model.safetensors` (this project's key layout), timm's `config.json`
(architecture, num_classes, pretrained_cfg, model_args) and a model card, so that
`timm.create_model('hf-hub:OWNER/NAME', pretrained=True)` loads it once flatten_timm is imported.
`convert_from_softmax` writes the same folder for a FLatten-DeiT warm-started from a timm softmax DeiT / ViT:
an initialisation for fine-tuning, which its config.json (`warm_start_from`) and model card say it is.
"""
import dataclasses
import json
import logging
import os
import re
import urllib.error
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple, Union

import torch
from timm.models import save_for_hf

from .zoo import RELEASED_TOP1

if TYPE_CHECKING:
    from .models.flatten_deit import WarmStart

_logger = logging.getLogger(__name__)

__all__ = ['PretrainedWeightsUnavailable', 'convert_checkpoint', 'convert_from_softmax', 'create_model_as_trained',
           'describe_warm_start', 'load_checkpoint_config', 'model_kwargs_from_config', 'push_folder_to_hub',
           'model_card', 'weights_download_error']

# pretrained_cfg entries that name where released weights come from: a trained checkpoint is its own source
_SOURCE_KEYS = ('url', 'file', 'state_dict', 'hf_hub_id', 'hf_hub_filename', 'source', 'custom_load')


def _pretrained_cfg_fields() -> set:
    from timm.models._pretrained import PretrainedCfg
    return {f.name for f in dataclasses.fields(PretrainedCfg)}


def load_checkpoint_config(path: Union[str, Path]) -> Dict[str, Any]:
    """ What a checkpoint file says about the model it holds, {} when it says nothing.

    Keys (each only when known): 'architecture'; 'pretrained_cfg', the data settings it was trained with
    (input_size, crop_pct, crop_mode, interpolation, mean, std, num_classes, label_names); 'model_args',
    create_model keywords that rebuild it (img_size, ...); 'dataset', what it was trained on; 'warm_start_from',
    the softmax model whose weights initialised it (`convert_from_softmax`: not trained, an initialisation).

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
    for key in ('dataset', 'warm_start_from'):
        if isinstance(raw.get(key), str) and raw[key]:
            config[key] = raw[key]
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
    if 'input_size' in overlay and overlay.get('pool_size'):  # a pyramid's final map is at stride 32 (a ViT has none)
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


def _training_lines(model, trained: bool, dataset: Optional[str], warm_start_from: Optional[str] = None) -> list:
    """ The model card's lines on the data: ImageNet-1k for the released layout, else what the checkpoint says;
    none for a warm start (`convert_from_softmax`), whose shared weights were trained in another model."""
    if warm_start_from:
        return [f'- **Training data:** none: not trained as a FLatten model. The weights it shares with '
                f'`{warm_start_from}` are that softmax model\'s; the parameters focused linear attention adds are '
                f'at their initialisation']
    if not trained:
        return ['- **Training data:** ImageNet-1k (official release)' if model.num_classes == 1000 else
                '- **Training data:** not recorded in the checkpoint']
    names = model.pretrained_cfg.get('label_names') or []
    shown = ', '.join(map(str, names[:20])) + (', ...' if len(names) > 20 else '')
    return [f'- **Training data:** {dataset or "not recorded in the checkpoint"}'] + (
        [f'- **Class names:** {shown}'] if names else [])


def _usage_lines(repo_name: str, warm_start_from: Optional[str]) -> list:
    if warm_start_from:
        return [
            'An initialisation to fine-tune, e.g. with a new classifier:',
            '```python',
            'import timm, flatten_timm  # importing flatten_timm registers the FLatten models',
            f"model = timm.create_model('hf-hub:{repo_name}', pretrained=True, num_classes=NUM_CLASSES)",
            '```',
            "or flatten_timm's `scripts/train.py --initial-checkpoint model.safetensors` "
            '(`configs/deit/*_warm_start.yaml` hold a short fine-tuning recipe).',
        ]
    return [
        '```python',
        'import timm, flatten_timm  # importing flatten_timm registers the FLatten models',
        f"model = timm.create_model('hf-hub:{repo_name}', pretrained=True).eval()",
        'cfg = timm.data.resolve_data_config({}, model=model)',
        'transform = timm.data.create_transform(**cfg)',
        '```',
    ]


def model_card(model, repo_name: str, license: str = DEFAULT_LICENSE, source: str = '', trained: bool = False,
               dataset: Optional[str] = None, warm_start_from: Optional[str] = None) -> str:
    """ A Hub model card (README.md with YAML metadata) for a converted FLatten checkpoint.

    trained: the checkpoint was trained by this project (it carries its config), so the paper's accuracy
    and ImageNet-1k are not claimed for it; dataset: what it was trained on, when known.
    warm_start_from: the timm softmax model whose weights initialised it (`convert_from_softmax`): the card
    says it is an initialisation for fine-tuning, claims no training data and reports no accuracy.
    """
    arch = model.pretrained_cfg['architecture']
    input_size = model.pretrained_cfg['input_size']
    released = not trained and not warm_start_from and model.num_classes == 1000
    top1 = RELEASED_TOP1.get(arch) if released else None
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    if license != DEFAULT_LICENSE:
        license_note = f'License: {license}.'
    elif warm_start_from:
        license_note = (f"The weights are derived from `{warm_start_from}`'s, whose license applies to them (see "
                        f"that model's card); the official FLatten repository states no license for its code.")
    else:
        license_note = ('The official repository (LeapLabTHU/FLatten-Transformer) states no license for its code or '
                        'weights; ask the authors before using these weights commercially.')
    if warm_start_from:
        summary = (
            f'FLatten Transformer `{arch}` (focused linear attention) in timm format: **an initialisation for '
            f'fine-tuning, not a trained classifier.** flatten_timm converted it from the weights of the softmax '
            f'model `{warm_start_from}`' + (f' (from `{source}`)' if source else '') + ': every weight the two models '
            'share is copied (patch embedding, class token, position embedding, qkv and output projections, norms, '
            "MLPs, head); what focused linear attention adds (each attention's depthwise conv, kernel scale and key "
            'positional encoding) is at its initialisation. The focused kernel attends differently from the softmax '
            'the weights were trained with, so fine-tune it before use.')
        top1_line = '- **Accuracy:** none reported: an initialisation for fine-tuning, not a trained classifier'
    else:
        summary = (f'FLatten Transformer `{arch}` (focused linear attention) in timm format, converted with '
                   f'flatten_timm' + (f' from `{source}`' if source else '') + '.')
        top1_line = (f'- **ImageNet-1k top-1 (paper / official release):** {top1:.1f}%' if top1 is not None else
                     '- **ImageNet-1k top-1:** not reported for this checkpoint')
    lines = [
        '---',
        'tags:', '- image-classification', '- timm', '- flatten_timm',
        'library_name: timm',
        f'license: {license}',
        *(['datasets:', '- imagenet-1k'] if released else []),
        '---',
        f'# {repo_name}',
        '',
        summary,
        '',
        '## Model details',
        f'- **Architecture:** {arch}',
        f'- **Params (M):** {params_m:.2f}',
        f'- **Image size:** {input_size[1]} x {input_size[2]}',
        f'- **Classes:** {model.num_classes}',
        *_training_lines(model, trained, dataset, warm_start_from),
        top1_line,
        '- **Paper:** FLatten Transformer: Vision Transformer using Focused Linear Attention, '
        'ICCV 2023, https://arxiv.org/abs/2308.00442',
        '- **Original code and weights:** https://github.com/LeapLabTHU/FLatten-Transformer',
        f'- **License:** {license_note}',
        '',
        '## Usage',
        *_usage_lines(repo_name, warm_start_from),
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
    warm_start_from = config.get('warm_start_from')  # a convert_from_softmax folder's file: still no more than that
    model_config = {'warm_start_from': warm_start_from} if warm_start_from else None
    return _write_folder(model, output_dir, model_config, repo_name, license,
                         source='' if warm_start_from else Path(checkpoint).name, trained=bool(config),
                         dataset=config.get('dataset'), warm_start_from=warm_start_from)


def _write_folder(model, output_dir: Union[str, Path], model_config: Optional[Dict[str, Any]], repo_name, license,
                  **card_kwargs) -> Path:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_for_hf(model.eval(), output_dir, model_config=model_config, safe_serialization=True)
    card = model_card(model, repo_name or output_dir.name, license=license, **card_kwargs)
    (output_dir / 'README.md').write_text(card, encoding='utf-8')
    _logger.info(f'{model.pretrained_cfg["architecture"]}: wrote {output_dir} (model.safetensors, config.json, '
                 f'README.md)')
    return output_dir


# the softmax model's preprocessing, which the copied weights were trained with
_SOFTMAX_DATA_CFG = ('interpolation', 'crop_pct', 'crop_mode', 'mean', 'std')


def _check_warm_start_names(model_name: str, softmax_name: str):
    import timm
    arch = model_name.split('.', 1)[0]
    if not arch.startswith('flatten_deit_'):
        deits = ', '.join(timm.list_models('flatten_deit_*'))
        raise ValueError(
            f'--from-softmax warm-starts FLatten-DeiT models only ({deits}), not {model_name}: no other FLatten '
            f'family has a timm softmax counterpart of the same layout. Convert an official FLatten checkpoint '
            f'of {model_name} with --checkpoint FILE instead.')
    if softmax_name.split('.', 1)[0].startswith('flatten_'):
        raise ValueError(f'{softmax_name} is a FLatten model, not a softmax one: --from-softmax takes a timm '
                         f'deit_* / vit_* model, e.g. deit_small_patch16_224')
    if not timm.is_model(softmax_name):
        raise ValueError(f'unknown softmax model {softmax_name!r}: timm has no model of that name. '
                         f"timm.list_models('deit_*') lists timm's DeiTs (e.g. deit_small_patch16_224)")


def _check_file_holds(state_dict: Dict[str, torch.Tensor], softmax, path, softmax_name: str):
    """The file is softmax_name's architecture (its position embedding and classifier may be of another size),
    so that the folder's record of where its weights come from is true."""
    from .checkpoint import CheckpointError
    expected = softmax.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.startswith('head.')]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [k for k in expected if k in state_dict and k != 'pos_embed' and not k.startswith('head.')
                  and state_dict[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        problems = [f'{what} {keys[:4]}{" ..." if len(keys) > 4 else ""}' for what, keys in (
            ('missing', missing), ('unexpected', unexpected), ('other shapes', mismatched)) if keys]
        raise CheckpointError(
            f"{path} does not hold {softmax_name}'s weights ({'; '.join(problems)}): pass --from-softmax the name "
            f'of the timm model the file was saved from')


def _grouped_keys(keys) -> str:
    """Keys, those of every block as one entry: blocks.{0..11}.attn.scale rather than twelve."""
    groups: Dict[str, Optional[list]] = {}  # 'blocks.{}.attn.scale' -> its block indices
    for k in keys:
        match = re.fullmatch(r'blocks\.(\d+)\.(.+)', k)
        if match:
            groups.setdefault(f'blocks.{{}}.{match[2]}', []).append(int(match[1]))
        else:
            groups[k] = None
    shown = []
    for name, indices in groups.items():
        if indices is None:
            shown.append(name)
        elif len(indices) == 1:
            shown.append(name.format(indices[0]))
        elif sorted(indices) == list(range(min(indices), max(indices) + 1)):
            shown.append(name.format(f'{{{min(indices)}..{max(indices)}}}'))
        else:
            shown.append(name.format('{' + ','.join(map(str, sorted(indices))) + '}'))
    return ', '.join(shown) or 'none'


def describe_warm_start(report: 'WarmStart', model_name: str, softmax_name: str) -> str:
    """What `warm_start_from_softmax` did, in lines for a person: tensors copied, added, resampled, re-initialised."""
    return '\n'.join([
        f'{model_name} initialised from {softmax_name} for fine-tuning (not a trained classifier):',
        f'  copied from {softmax_name}: {len(report.copied)} tensors',
        f'  added by focused linear attention, left at their initialisation: {len(report.added)} tensors: '
        f'{_grouped_keys(report.added)}',
        f'  resampled to the patch grid: {_grouped_keys(report.resampled)}',
        f'  re-initialised (another shape, e.g. the class count): {_grouped_keys(report.reinitialised)}',
    ])


def convert_from_softmax(
        model_name: str,
        softmax_name: str,
        output_dir: Union[str, Path],
        checkpoint: Optional[Union[str, Path]] = None,
        key: Optional[str] = None,
        repo_name: Optional[str] = None,
        license: str = DEFAULT_LICENSE,
        **model_kwargs,
) -> Tuple[Path, 'WarmStart']:
    """ A FLatten-DeiT warm-started from a timm softmax DeiT / ViT, written as a timm Hub folder.

    The softmax weights come from `checkpoint` (.pth or .safetensors, read with the safe loader; it must hold
    `softmax_name`'s architecture) or, without one, from timm's download of `softmax_name`'s pretrained weights.
    `warm_start_from_softmax` copies every weight the models share; the FLatten-DeiT takes the softmax model's
    class count and preprocessing (mean / std, interpolation, crop). The folder (model.safetensors, config.json,
    README.md, as `convert_checkpoint` writes) is an initialisation for fine-tuning, not a trained classifier:
    config.json records `warm_start_from` and a description saying so, and the model card claims no training
    data and no accuracy.

    Raises ValueError when model_name is not a FLatten-DeiT, softmax_name is unknown to timm, or the two differ
    in size (`warm_start_from_softmax`'s errors, raised before any download); CheckpointError when the file
    does not hold softmax_name's weights; PretrainedWeightsUnavailable when the download fails.
    model_kwargs (e.g. img_size) build the FLatten-DeiT and are recorded in config.json; num_classes other than
    the softmax model's leaves the head initialised.
    Returns the folder and the `WarmStart` report (keys copied, added, resampled, re-initialised).
    """
    import timm
    from .checkpoint import load_checkpoint_file
    from .models.flatten_deit import warm_start_from_softmax
    _check_warm_start_names(model_name, softmax_name)
    num_classes = model_kwargs.pop('num_classes', None)  # another class count: the head is left initialised
    with torch.device('meta'):  # the architectures alone: a softmax model of another size fails before a download
        softmax_arch = timm.create_model(softmax_name)
        warm_start_from_softmax(timm.create_model(
            model_name, num_classes=softmax_arch.num_classes if num_classes is None else num_classes,
            **model_kwargs), softmax_arch)
    if checkpoint is not None:
        state_dict = load_checkpoint_file(os.fspath(checkpoint), key)
        _check_file_holds(state_dict, softmax_arch, checkpoint, softmax_name)
        softmax_cfg = softmax_arch.pretrained_cfg
        head = state_dict.get('head.weight')
        softmax_classes = head.shape[0] if head is not None and head.ndim == 2 else 0
        source = Path(checkpoint).name
    else:
        try:
            softmax = timm.create_model(softmax_name, pretrained=True)
        except Exception as e:
            if not _is_download_failure(e):
                raise
            cfg = softmax_arch.pretrained_cfg
            sources = ([f"https://huggingface.co/{cfg['hf_hub_id']}"] if cfg.get('hf_hub_id') else []) + (
                [cfg['url']] if isinstance(cfg.get('url'), str) and cfg['url'] else [])
            reason = getattr(e, 'reason', None) or e
            raise PretrainedWeightsUnavailable(
                f'could not download the weights of {softmax_name} ({type(e).__name__}: {reason}). Without a '
                f'network, download them where there is one' + (f' ({", ".join(sources)})' if sources else '')
                + ' and pass the file (.pth or .safetensors): --checkpoint FILE', reason) from None
        state_dict, softmax_cfg, softmax_classes = softmax.state_dict(), softmax.pretrained_cfg, softmax.num_classes
        source = softmax_cfg.get('hf_hub_id') or softmax_cfg.get('url') or "timm's pretrained weights"
    description = (f'An initialisation for fine-tuning, converted from the softmax weights of {softmax_name}; '
                   f'the parameters focused linear attention adds are at their initialisation. Not a trained '
                   f'classifier: no accuracy is reported.')
    overlay = {k: softmax_cfg[k] for k in _SOFTMAX_DATA_CFG if softmax_cfg.get(k) is not None}
    if model_kwargs.get('img_size') is not None:  # the size it is built at is the size its data config gives
        size = model_kwargs['img_size']
        overlay['input_size'] = (model_kwargs.get('in_chans', 3), *((size,) * 2 if isinstance(size, int) else size))
    overlay.update(description=description, **model_kwargs.pop('pretrained_cfg_overlay', {}))
    model = timm.create_model(model_name, num_classes=softmax_classes if num_classes is None else num_classes,
                              pretrained_cfg_overlay=overlay, **model_kwargs)
    report = warm_start_from_softmax(model, state_dict)
    folder = _write_folder(model, output_dir, {'warm_start_from': softmax_name}, repo_name, license, source=source,
                           warm_start_from=softmax_name)
    return folder, report


def push_folder_to_hub(folder: Union[str, Path], repo_id: str, private: bool = False,
                       token: Optional[str] = None, commit_message: str = 'Add FLatten weights') -> str:
    """Upload a converted folder to the Hugging Face Hub (creating the repository if needed); returns its URL."""
    from huggingface_hub import HfApi
    api = HfApi(token=token, library_name='flatten_timm')
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    return f'{api.endpoint}/{repo_id}'
