""" Converting official FLatten checkpoints into timm Hub folders, and uploading them.

A converted folder holds `model.safetensors` (this project's key layout), timm's `config.json`
(architecture, num_classes, pretrained_cfg) and a model card, so that
`timm.create_model('hf-hub:OWNER/NAME', pretrained=True)` loads it once flatten_timm is imported.
"""
import logging
from pathlib import Path
from typing import Optional, Union

from timm.models import save_for_hf

from .zoo import RELEASED_TOP1

_logger = logging.getLogger(__name__)

__all__ = ['convert_checkpoint', 'push_folder_to_hub', 'model_card']

# The official repository publishes no license for its code or weights.
DEFAULT_LICENSE = 'other'

CITATION = """@InProceedings{han2023flatten,
  title={FLatten Transformer: Vision Transformer using Focused Linear Attention},
  author={Han, Dongchen and Pan, Xuran and Han, Yizeng and Song, Shiji and Huang, Gao},
  booktitle={Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
  year={2023}
}"""


def model_card(model, repo_name: str, license: str = DEFAULT_LICENSE, source: str = '') -> str:
    """ A Hub model card (README.md with YAML metadata) for a converted FLatten checkpoint."""
    arch = model.pretrained_cfg['architecture']
    input_size = model.pretrained_cfg['input_size']
    top1 = RELEASED_TOP1.get(arch) if model.num_classes == 1000 else None
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
        'datasets:', '- imagenet-1k',
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
    the model takes the checkpoint's class count.

    model_kwargs (e.g. img_size, depths) are recorded in config.json, so the Hub copy rebuilds the same model.
    Returns the output folder, holding model.safetensors, config.json and README.md.
    """
    from .checkpoint import create_model_from_checkpoint
    model = create_model_from_checkpoint(model_name, checkpoint, key, **model_kwargs)

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_for_hf(model.eval(), output_dir, safe_serialization=True)
    card = model_card(model, repo_name or output_dir.name, license=license, source=Path(checkpoint).name)
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
