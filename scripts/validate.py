#!/usr/bin/env python3
r""" Evaluate a flatten_* model on an ImageFolder validation set: top-1, top-5 and loss.

    python scripts/validate.py --data-dir /data/imagenet --model flatten_swin_tiny_patch4_224 \
        --checkpoint flatten_swin_t.pth          # an official file, or this project's / train.py's
    python scripts/validate.py --data-dir /data/imagenet/val --model flatten_pvt_tiny --pretrained

Uses the model's own eval transform (the official protocol: square resize to size / 0.875, centre
crop, bicubic; a direct resize for the 384 Swin-B fine-tune). A checkpoint of `scripts/train.py`
is evaluated as it was trained: at its input size, crop and mean/std, with its class count
(`--img-size` and `--crop-pct` override). `--data-dir` is the class-folder root or a folder with a
`val/` sub-folder. Prints a summary and writes it as JSON (`--results-file`).
"""
import argparse
import json
import logging
import os
import sys
import time
import urllib.error
from contextlib import nullcontext

import torch
import torch.nn as nn

import timm
from timm.data import create_dataset, create_loader, resolve_data_config
from timm.utils import accuracy

import flatten_timm  # noqa: F401  registers the models
from flatten_timm.checkpoint import CheckpointError
from flatten_timm.hub import PretrainedWeightsUnavailable, create_model_as_trained

_logger = logging.getLogger('validate')


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default in --help."""


def default_workers() -> int:
    """timm's 4 data loading processes, or fewer on a machine with fewer CPUs."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    return max(1, min(4, cpus))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument('--data-dir', required=True, help='ImageFolder root (or its parent with val/)')
    p.add_argument('--split', default='val', help='sub-folder used when --data-dir has one')
    p.add_argument('--model', required=True, help="model name, or 'hf-hub:OWNER/NAME'")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument('--pretrained', action='store_true', help='the pretrained weights of --model')
    weights.add_argument('--checkpoint', default='', help='weights file: official .pth, train.py checkpoint, '
                                                          '.safetensors')
    p.add_argument('--use-ema', action='store_true', help="evaluate the checkpoint's EMA weights")
    p.add_argument('--num-classes', type=int, default=None, help="classes (None: the checkpoint's or the model's)")
    p.add_argument('--img-size', type=int, default=None,
                   help="evaluation resolution (None: the checkpoint's training size, else the model's)")
    p.add_argument('--crop-pct', type=float, default=None,
                   help="crop fraction (None: the checkpoint's, else the model's)")
    p.add_argument('-b', '--batch-size', type=int, default=100, help='images per batch')
    p.add_argument('--workers', '-j', type=int, default=default_workers(),
                   help='data loading processes (4, or the CPUs available when fewer)')
    p.add_argument('--amp', action='store_true', help='mixed precision')
    p.add_argument('--amp-dtype', default='bfloat16', choices=['float16', 'bfloat16'], help='mixed precision dtype')
    p.add_argument('--channels-last', action='store_true', help='channels-last memory format')
    p.add_argument('--device', default=None, help='cuda or cpu (None: cuda when available)')
    p.add_argument('--results-file', default='', help='write the summary here as JSON')
    p.add_argument('--log-interval', type=int, default=50, help='batches between progress lines')
    return p


def _first(names, count: int = 5) -> str:
    return ', '.join(map(str, names[:count])) + (', ...' if len(names) > count else '')


def load_model(args) -> nn.Module:
    kwargs = {'num_classes': args.num_classes} if args.num_classes else {}
    if args.img_size:
        kwargs['img_size'] = args.img_size
    if args.checkpoint:
        key = 'model_ema' if args.use_ema else None
        return create_model_as_trained(args.model, args.checkpoint, key=key, **kwargs)
    if not args.pretrained:
        _logger.warning('neither --pretrained nor --checkpoint: evaluating random weights')
    return timm.create_model(args.model, pretrained=args.pretrained, **kwargs)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s', datefmt='%H:%M:%S')
    if not (args.model.startswith('hf-hub:') or timm.is_model(args.model)):
        raise SystemExit(f'unknown model {args.model!r}; `flatten-timm models` lists the flatten models')
    root = os.path.join(args.data_dir, args.split) if os.path.isdir(os.path.join(args.data_dir, args.split)) \
        else args.data_dir
    if not os.path.isdir(root):
        raise SystemExit(f'validation folder {root} not found')
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    try:
        model = load_model(args).to(device).eval()
    except (CheckpointError, FileNotFoundError, PretrainedWeightsUnavailable) as e:
        raise SystemExit(str(e))
    except urllib.error.URLError as e:
        raise SystemExit(f'could not download the weights of {args.model} ({e.reason}): pass --checkpoint FILE')
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)

    data_config = resolve_data_config(vars(args), model=model)
    dataset = create_dataset('', root=root, split='', is_training=False)
    loader = create_loader(
        dataset, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=False,
        interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
        crop_pct=data_config['crop_pct'], crop_mode=data_config.get('crop_mode'), num_workers=args.workers,
        use_prefetcher=False, pin_memory=device.type == 'cuda', device=device)
    num_classes = len(dataset.reader.class_to_idx)
    if num_classes > model.num_classes:
        raise SystemExit(f'the dataset has {num_classes} classes, the model {model.num_classes}')
    label_names = model.pretrained_cfg.get('label_names')
    folders = sorted(dataset.reader.class_to_idx, key=dataset.reader.class_to_idx.get)
    if label_names and list(label_names[:num_classes]) != folders:
        _logger.warning(f'the class folders ({_first(folders)}) are not the classes the model was trained on '
                        f'({_first(label_names)}) in that order: its predictions are scored against other labels')
    _logger.info(f'evaluating at {data_config["input_size"][-2]}x{data_config["input_size"][-1]}, '
                 f'crop {data_config["crop_pct"]} ({data_config.get("crop_mode") or "center"}), '
                 f'{data_config["interpolation"]}, {len(dataset)} images')

    amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    amp_ctx = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if args.amp else nullcontext
    loss_fn = nn.CrossEntropyLoss(reduction='sum')
    loss_sum = top1_sum = top5_sum = count = 0.
    start = time.time()
    with torch.inference_mode():
        for i, (images, targets) in enumerate(loader):
            images, targets = images.to(device), targets.to(device)
            if args.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with amp_ctx():
                output = model(images).float()
            n = images.shape[0]
            top1, top5 = accuracy(output, targets, topk=(1, min(5, output.shape[-1])))
            loss_sum += loss_fn(output, targets).item()
            top1_sum += top1.item() * n / 100
            top5_sum += top5.item() * n / 100
            count += n
            if i % args.log_interval == 0:
                _logger.info(f'[{i + 1}/{len(loader)}] top-1 {100 * top1_sum / count:.2f} '
                             f'top-5 {100 * top5_sum / count:.2f}')
    results = {
        'model': args.model, 'checkpoint': args.checkpoint or ('pretrained' if args.pretrained else 'random'),
        'ema': args.use_ema, 'images': int(count), 'top1': round(100 * top1_sum / count, 3),
        'top5': round(100 * top5_sum / count, 3), 'loss': round(loss_sum / count, 4),
        'img_size': data_config['input_size'][-1], 'crop_pct': data_config['crop_pct'],
        'interpolation': data_config['interpolation'], 'seconds': round(time.time() - start, 1),
    }
    print(f"{results['model']}: top-1 {results['top1']:.2f}  top-5 {results['top5']:.2f}  "
          f"loss {results['loss']:.4f}  ({results['images']} images)")
    if args.results_file:
        with open(args.results_file, 'w') as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
