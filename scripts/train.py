#!/usr/bin/env python3
r""" Train (or fine-tune) a flatten_* model on ImageNet or an image folder, on one device or many.

    python scripts/train.py --config configs/flatten_pvt_tiny.yaml --data-dir /data/imagenet
    torchrun --nproc_per_node=8 scripts/train.py --config configs/flatten_swin_tiny_patch4_224.yaml \
        --data-dir /data/imagenet --output runs/

Flags are named as in timm's train.py; `--config` reads a YAML of the same keys (flag names with
underscores), which the command line overrides (`--config FILE --help` shows its values as the
defaults). `--lr`, `--warmup-lr` and `--min-lr` are given for a global batch of `--lr-base-size`
(512, as in the paper) and scaled linearly to the actual global batch (batch x processes x
accumulation steps). A run lasts `--epochs` plus `--cooldown-epochs` at the minimum learning rate
(the paper's configs cool down for 10).

Data: an ImageFolder root with `train/` and (optionally) `val/` class folders, or any
timm dataset (`--dataset`). Distributed through torchrun (NCCL on GPUs, gloo on CPU), multi-node
through its rendezvous. Each epoch appends to `summary.csv` and `summary.jsonl` in the output
folder and saves `last.pth.tar` (and `model_best.pth.tar`) atomically; `--resume` continues at the
next epoch with identical state: every epoch reseeds all random generators from (seed, epoch, rank).
Checkpoints record what the model was trained with (input size, crop, mean/std, class names, the
dataset), which `scripts/validate.py` and `flatten-timm predict / convert / export` use.
"""
import argparse
import csv
import json
import logging
import os
import sys
import time
from contextlib import nullcontext
from datetime import timedelta
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import yaml

import timm
import timm.data
from timm.data import Mixup, create_dataset, create_loader, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import AverageMeter, ModelEmaV3, accuracy, dispatch_clip_grad, random_seed

import flatten_timm  # noqa: F401  registers the models
from flatten_timm.hub import PretrainedWeightsUnavailable

_logger = logging.getLogger('train')

# keys a config may carry besides the flags: what the paper used, for the record and a warning
CONFIG_METADATA_KEYS = {'paper_global_batch', 'paper_gpus', 'notes'}


def _posterize_zero_bits_as_black():
    """ RandAugment's 'PosterizeIncreasing' (the paper's rand-m9-mstd0.5-inc1) can ask for 0 bits, which
    Pillow < 13 turned into a black image and Pillow >= 13 refuses; keep the behaviour the recipe was
    trained with instead of crashing a data worker."""
    from PIL import Image
    from timm.data import auto_augment

    def posterize(img, bits_to_keep, **kwargs):
        if bits_to_keep <= 0:
            return Image.new(img.mode, img.size)
        return auto_augment.posterize(img, bits_to_keep, **kwargs)

    for name in ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal'):
        auto_augment.NAME_TO_OP[name] = posterize


_posterize_zero_bits_as_black()


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default in --help."""


def available_cpus() -> int:
    """CPUs this process may run on (its affinity, as the DataLoader's worker check counts them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)


def default_workers() -> int:
    """timm's 4 data loading processes, or fewer on a machine with fewer CPUs."""
    return max(1, min(4, available_cpus()))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument('--config', default='', help='YAML of flag values (underscored names); flags override it')
    g = p.add_argument_group('data')
    g.add_argument('--data-dir', default=None, help='dataset root (ImageFolder: contains train/ and val/)')
    g.add_argument('--dataset', default='', help="timm dataset name; '' for an image folder")
    g.add_argument('--train-split', default='train', help='training split (sub-folder of --data-dir)')
    g.add_argument('--val-split', default='val', help="validation split; '' to skip validation")
    g.add_argument('--workers', '-j', type=int, default=default_workers(),
                   help='data loading processes per rank (4, or the CPUs available when fewer)')
    g = p.add_argument_group('model')
    g.add_argument('--model', default='flatten_pvt_tiny', help='model name (`flatten-timm models` lists them)')
    g.add_argument('--pretrained', action='store_true', help='start from the pretrained weights')
    g.add_argument('--initial-checkpoint', default='', help='start from these weights (official or ours)')
    g.add_argument('--num-classes', type=int, default=None, help='classes (None: from the dataset)')
    g.add_argument('--img-size', type=int, default=None, help='training resolution (None: the model\'s)')
    g.add_argument('--drop-path', type=float, default=0.1, help='stochastic depth rate')
    g.add_argument('--channels-last', action='store_true', help='channels-last memory format')
    g = p.add_argument_group('optimisation')
    g.add_argument('-b', '--batch-size', type=int, default=128, help='batch per process')
    g.add_argument('--grad-accum-steps', type=int, default=1, help='micro-batches per optimiser step')
    g.add_argument('--epochs', type=int, default=300,
                   help='epochs of the schedule, warm-up included; --cooldown-epochs more follow')
    g.add_argument('--opt', default='adamw', help='optimiser (a timm name)')
    g.add_argument('--opt-eps', type=float, default=1e-8, help='optimiser epsilon')
    g.add_argument('--opt-betas', type=float, nargs=2, default=(0.9, 0.999), help='Adam betas')
    g.add_argument('--momentum', type=float, default=0.9, help='SGD momentum')
    g.add_argument('--weight-decay', type=float, default=0.05, help='weight decay')
    g.add_argument('--clip-grad', type=float, default=None, help='gradient clipping threshold (None: no clipping)')
    g.add_argument('--clip-mode', default='norm', help="gradient clipping: 'norm', 'value' or 'agc'")
    g.add_argument('--lr', type=float, default=5e-4, help='learning rate at a global batch of --lr-base-size')
    g.add_argument('--lr-base-size', type=int, default=512, help='reference global batch of --lr (0: no scaling)')
    g.add_argument('--sched', default='cosine', help='learning rate schedule (a timm name)')
    g.add_argument('--warmup-epochs', type=int, default=5, help='epochs of linear warm-up from --warmup-lr')
    g.add_argument('--warmup-lr', type=float, default=1e-6, help='learning rate where the warm-up starts')
    g.add_argument('--min-lr', type=float, default=1e-5, help='learning rate at the end of the schedule')
    g.add_argument('--cooldown-epochs', type=int, default=0,
                   help='epochs at --min-lr after --epochs (the run lasts --epochs + --cooldown-epochs)')
    g = p.add_argument_group('augmentation and regularisation')
    g.add_argument('--aa', default=None,
                   help="RandAugment policy, e.g. 'rand-m9-mstd0.5-inc1'; 'none' or '' switches off a config's")
    g.add_argument('--color-jitter', type=float, default=0.4, help='colour jitter strength')
    g.add_argument('--reprob', type=float, default=0., help='random erasing probability')
    g.add_argument('--remode', default='pixel', help='random erasing mode')
    g.add_argument('--mixup', type=float, default=0., help='Mixup alpha (0: off)')
    g.add_argument('--cutmix', type=float, default=0., help='CutMix alpha (0: off)')
    g.add_argument('--mixup-prob', type=float, default=1., help='probability of Mixup or CutMix per batch')
    g.add_argument('--mixup-switch-prob', type=float, default=0.5, help='probability of CutMix when both are on')
    g.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    g.add_argument('--train-interpolation', default='bicubic', help='resize interpolation of training images')
    g.add_argument('--model-ema', action='store_true', help='keep an exponential moving average of the weights')
    g.add_argument('--model-ema-decay', type=float, default=0.9998, help='decay of the weights\' average')
    g = p.add_argument_group('run')
    g.add_argument('--amp', action='store_true', help='mixed precision')
    g.add_argument('--amp-dtype', default='float16', choices=['float16', 'bfloat16'], help='mixed precision dtype')
    g.add_argument('--device', default=None, help='cuda or cpu (None: cuda when available)')
    g.add_argument('--resume', default='', help='checkpoint of this script to continue from')
    g.add_argument('--output', default='output', help='folder for checkpoints and logs')
    g.add_argument('--experiment', default='', help='sub-folder name (\'\': the model name)')
    g.add_argument('--seed', type=int, default=42, help='random seed')
    g.add_argument('--log-interval', type=int, default=50, help='steps between progress lines')
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Flags, over the --config YAML, over the defaults; unknown YAML keys are an error."""
    parser = build_parser()
    # --config first (without --help), so that `--config FILE --help` shows the config's values as defaults
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument('--config', default='')
    known, _ = config_parser.parse_known_args(argv)
    metadata = {}
    if known.config:
        if not os.path.isfile(known.config):
            parser.error(f'--config {known.config}: no such file')
        with open(known.config) as f:
            config = yaml.safe_load(f) or {}
        dests = {a.dest for a in parser._actions}
        unknown = set(config) - dests - CONFIG_METADATA_KEYS
        if unknown:
            parser.error(f'{known.config}: unknown keys {sorted(unknown)} (use flag names with underscores)')
        metadata = {k: config.pop(k) for k in list(config) if k in CONFIG_METADATA_KEYS}
        parser.set_defaults(**config)
    args = parser.parse_args(argv)
    if args.aa is not None and str(args.aa).strip().lower() in ('', 'none'):
        args.aa = None  # timm knows no policy 'none': no auto-augmentation at all
    args.config_metadata = metadata
    return args


def check_args(args):
    """Fail at once, before any data is read, on arguments that cannot work."""
    if not (args.model.startswith('hf-hub:') or timm.is_model(args.model)):
        raise SystemExit(f'unknown model {args.model!r}; `flatten-timm models` lists the flatten models')
    if args.batch_size % args.grad_accum_steps:
        raise SystemExit(f'--batch-size {args.batch_size} is not divisible by --grad-accum-steps '
                         f'{args.grad_accum_steps}: each step needs batch / steps images')
    if not args.dataset:
        if not args.data_dir:
            raise SystemExit('--data-dir is required for an image folder dataset')
        train_dir = os.path.join(args.data_dir, args.train_split)
        if not os.path.isdir(train_dir):
            raise SystemExit(f'training folder {train_dir} not found: --data-dir must contain '
                             f'{args.train_split}/<class>/<images>')
    if args.resume and not os.path.isfile(args.resume):
        raise SystemExit(f'--resume {args.resume}: no such file')
    if args.initial_checkpoint and not os.path.isfile(args.initial_checkpoint):
        raise SystemExit(f'--initial-checkpoint {args.initial_checkpoint}: no such file')
    if args.amp and args.amp_dtype == 'float16' and not torch.cuda.is_available():
        raise SystemExit('--amp-dtype float16 needs a GPU; use --amp-dtype bfloat16 on the CPU')


def scaled_lrs(args, world_size: int) -> dict:
    """lr, warmup lr and min lr scaled by global batch / lr_base_size (the paper's rule)."""
    global_batch = args.batch_size * world_size
    factor = global_batch / args.lr_base_size if args.lr_base_size else 1.
    return {'lr': args.lr * factor, 'warmup_lr': args.warmup_lr * factor, 'min_lr': args.min_lr * factor,
            'global_batch': global_batch}


def build_model(args, num_classes: int):
    kwargs = dict(num_classes=num_classes, drop_path_rate=args.drop_path)
    if args.img_size:
        kwargs['img_size'] = args.img_size
    try:
        model = timm.create_model(args.model, pretrained=args.pretrained, **kwargs)
    except PretrainedWeightsUnavailable as e:
        raise SystemExit(f'{e} (here: --initial-checkpoint FILE instead of --pretrained)')
    if args.initial_checkpoint:
        model.load_pretrained(args.initial_checkpoint)
    return model


def class_names(dataset) -> Optional[List[str]]:
    """The dataset's class names in label order (an image folder's sub-folder names), if it has them."""
    class_to_idx = getattr(getattr(dataset, 'reader', None), 'class_to_idx', None)
    if not class_to_idx:
        return None
    names = sorted(class_to_idx, key=class_to_idx.get)
    return [str(n) for n in names] if list(map(class_to_idx.get, names)) == list(range(len(names))) else None


def trained_config(args, data_config: dict, num_classes: int, label_names: Optional[List[str]]) -> dict:
    """ What a checkpoint records about how its model is used (flatten_timm.hub.load_checkpoint_config reads it):
    the eval data settings as a timm pretrained_cfg, the create_model keywords that rebuild the model, the dataset.
    """
    pretrained_cfg = {k: data_config[k] for k in ('input_size', 'interpolation', 'crop_pct', 'crop_mode', 'mean', 'std')
                      if data_config.get(k) is not None}
    pretrained_cfg.update(architecture=args.model, num_classes=num_classes)
    if label_names and len(label_names) == num_classes:
        pretrained_cfg['label_names'] = label_names
    dataset = args.dataset or (f'image folder {os.path.basename(os.path.normpath(args.data_dir))}'
                               if args.data_dir else None)
    return {
        'pretrained_cfg': pretrained_cfg,
        'model_args': {'img_size': args.img_size} if args.img_size else {},
        'dataset': dataset,
    }


def describe_epochs(args, num_epochs: int) -> str:
    """'300 epochs', or '1 epoch + 10 cool-down' where the schedule adds --cooldown-epochs at the minimum lr."""
    def epochs(n):
        return f'{n} epoch{"s" if n != 1 else ""}'
    if num_epochs == args.epochs:
        return epochs(num_epochs)
    return f'{epochs(args.epochs)} + {num_epochs - args.epochs} cool-down (--cooldown-epochs) = {epochs(num_epochs)}'


def build_optimizer_and_scheduler(args, model, world_size: int, updates_per_epoch: int):
    lrs = scaled_lrs(args, world_size)
    optimizer = create_optimizer_v2(
        model, opt=args.opt, lr=lrs['lr'], weight_decay=args.weight_decay, momentum=args.momentum,
        eps=args.opt_eps, betas=tuple(args.opt_betas))
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        warmup_lr=lrs['warmup_lr'], min_lr=lrs['min_lr'], cooldown_epochs=args.cooldown_epochs,
        step_on_epochs=False, updates_per_epoch=updates_per_epoch)  # per-update, as the official runs
    return optimizer, scheduler, num_epochs


# ---- distributed ------------------------------------------------------------------------------

def init_distributed(args):
    """(device, rank, world_size), from torchrun's environment; a single process otherwise."""
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    rank = int(os.environ.get('RANK', 0))
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    use_cuda = (args.device or ('cuda' if torch.cuda.is_available() else 'cpu')).startswith('cuda')
    device = torch.device(f'cuda:{local_rank}' if use_cuda else 'cpu')
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group('nccl' if use_cuda else 'gloo', timeout=timedelta(minutes=30))
    return device, rank, world_size


def all_reduce_mean(value: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= world_size
    return value


def check_ranks_in_sync(model: nn.Module, world_size: int) -> float:
    """All ranks must hold the same weights; returns the weights' checksum."""
    checksum = torch.stack([p.detach().double().sum() for p in model.state_dict().values()
                            if p.is_floating_point()]).sum().reshape(1).to(next(model.parameters()).device)
    if world_size > 1:
        gathered = [torch.zeros_like(checksum) for _ in range(world_size)]
        dist.all_gather(gathered, checksum)
        if any(not torch.equal(g, checksum) for g in gathered):
            raise RuntimeError(f'ranks hold different weights: {[g.item() for g in gathered]}')
    return checksum.item()


# ---- checkpoints and logs ---------------------------------------------------------------------

def save_atomically(state: dict, path: str):
    """Write to a temporary file, then rename: a killed run never leaves a half-written checkpoint."""
    tmp = f'{path}.tmp'
    torch.save(state, tmp)
    os.replace(tmp, path)


def append_summary(folder: str, row: dict):
    path = os.path.join(folder, 'summary.csv')
    new = not os.path.exists(path)
    with open(path, 'a', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)
    with open(os.path.join(folder, 'summary.jsonl'), 'a') as f:
        f.write(json.dumps(row) + '\n')


# ---- one epoch --------------------------------------------------------------------------------

def train_one_epoch(epoch, model, loader, optimizer, scheduler, loss_fn, args, device, world_size,
                    mixup=None, scaler=None, ema=None, amp_ctx=nullcontext, num_epochs=1, run_start=None):
    model.train()
    losses = AverageMeter()
    accum = args.grad_accum_steps
    steps = len(loader) // accum
    num_updates = epoch * steps
    step_start = time.time()
    batch_iter = iter(loader)
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        for micro in range(accum):
            images, targets = next(batch_iter)
            images, targets = images.to(device), targets.to(device)
            if mixup is not None:
                images, targets = mixup(images, targets)
            if args.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            # DDP syncs gradients on the last micro-batch only
            sync = nullcontext() if micro == accum - 1 or world_size == 1 else model.no_sync()
            with sync, amp_ctx():
                loss = loss_fn(model(images), targets) / accum
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
            losses.update(loss.item() * accum, images.shape[0])
        if scaler is not None:
            scaler.unscale_(optimizer)
        if args.clip_grad:
            dispatch_clip_grad(model.parameters(), args.clip_grad, mode=args.clip_mode)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if ema is not None:
            ema.update(model, step=num_updates)
        num_updates += 1
        scheduler.step_update(num_updates=num_updates)
        if (step % args.log_interval == 0 or step == steps - 1) and _is_main():
            elapsed = time.time() - step_start
            per_step = elapsed / (step + 1)
            eta = per_step * (steps - step - 1) + per_step * steps * (num_epochs - epoch - 1)
            _logger.info(
                f'epoch {epoch} [{step + 1:>4}/{steps} ({100 * (step + 1) / steps:3.0f}%)] '
                f'loss {losses.val:.4f} ({losses.avg:.4f}) lr {optimizer.param_groups[0]["lr"]:.3e} '
                f'{args.batch_size * world_size / per_step / accum:.1f} img/s '
                f'ETA {timedelta(seconds=int(eta))}')
    return all_reduce_mean(torch.tensor(losses.avg, device=device), world_size).item()


@torch.no_grad()
def evaluate(model, loader, device, world_size, amp_ctx=nullcontext, channels_last=False):
    model.eval()
    loss_fn = nn.CrossEntropyLoss()
    totals = torch.zeros(4, device=device, dtype=torch.float64)  # loss sum, top-1, top-5, count
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with amp_ctx():
            output = model(images)
        n = images.shape[0]
        top1, top5 = accuracy(output.float(), targets, topk=(1, min(5, output.shape[-1])))
        totals += torch.tensor([loss_fn(output.float(), targets).item() * n, top1.item() * n / 100,
                                top5.item() * n / 100, n], device=device, dtype=torch.float64)
    if world_size > 1:
        dist.all_reduce(totals)
    loss, top1, top5, count = totals.tolist()
    return {'loss': loss / count, 'top1': 100 * top1 / count, 'top5': 100 * top5 / count}


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


# ---- main -------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s', datefmt='%H:%M:%S')
    check_args(args)
    device, rank, world_size = init_distributed(args)
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    lrs = scaled_lrs(args, world_size)
    expected = args.config_metadata.get('paper_global_batch')
    if expected and expected != lrs['global_batch']:
        _logger.warning(f'global batch {lrs["global_batch"]} differs from the paper\'s {expected}: '
                        f'learning rates are scaled to it (lr {lrs["lr"]:.3e})')

    random_seed(args.seed, 0)  # the same initial weights on every rank
    train_set = create_dataset(args.dataset, root=args.data_dir, split=args.train_split, is_training=True,
                               batch_size=args.batch_size, seed=args.seed)
    val_set = None
    if args.val_split and (args.dataset or os.path.isdir(os.path.join(args.data_dir, args.val_split))):
        val_set = create_dataset(args.dataset, root=args.data_dir, split=args.val_split, is_training=False,
                                 batch_size=args.batch_size)
    num_classes = args.num_classes or len(getattr(train_set.reader, 'class_to_idx', {})) or 1000
    model = build_model(args, num_classes).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    data_config = resolve_data_config(vars(args), model=model, verbose=_is_main())

    mixup_on = args.mixup > 0 or args.cutmix > 0
    mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                  switch_prob=args.mixup_switch_prob, label_smoothing=args.smoothing,
                  num_classes=num_classes) if mixup_on else None
    micro_batch = args.batch_size // args.grad_accum_steps
    train_loader = create_loader(
        train_set, input_size=data_config['input_size'], batch_size=micro_batch, is_training=True,
        re_prob=args.reprob, re_mode=args.remode, color_jitter=args.color_jitter, auto_augment=args.aa,
        interpolation=args.train_interpolation, mean=data_config['mean'], std=data_config['std'],
        num_workers=args.workers, distributed=world_size > 1, use_prefetcher=False,
        pin_memory=device.type == 'cuda', persistent_workers=False, device=device)
    val_loader = None
    if val_set is not None:
        val_loader = create_loader(
            val_set, input_size=data_config['input_size'], batch_size=micro_batch, is_training=False,
            interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
            crop_pct=data_config['crop_pct'], crop_mode=data_config.get('crop_mode'),
            num_workers=args.workers, distributed=world_size > 1, use_prefetcher=False,
            persistent_workers=False, device=device)
    updates_per_epoch = len(train_loader) // args.grad_accum_steps
    if updates_per_epoch == 0:
        raise SystemExit(f'the training set has {len(train_set)} images, fewer than one batch per rank')

    optimizer, scheduler, num_epochs = build_optimizer_and_scheduler(args, model, world_size, updates_per_epoch)
    checkpoint_config = trained_config(args, data_config, num_classes, class_names(train_set))
    if mixup_on:
        loss_fn = SoftTargetCrossEntropy()
    elif args.smoothing:
        loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        loss_fn = nn.CrossEntropyLoss()
    amp_dtype = torch.bfloat16 if args.amp_dtype == 'bfloat16' else torch.float16
    amp_ctx = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if args.amp else nullcontext
    scaler = torch.amp.GradScaler(device.type) if args.amp and amp_dtype == torch.float16 else None
    ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None

    start_epoch, best = 0, None
    if args.resume:
        state = torch.load(args.resume, map_location='cpu', weights_only=True)
        model.load_state_dict(state['model'])
        optimizer.load_state_dict(state['optimizer'])
        scheduler.load_state_dict(state['scheduler'])
        if scaler is not None and state.get('scaler'):
            scaler.load_state_dict(state['scaler'])
        if ema is not None and state.get('model_ema'):
            ema.module.load_state_dict(state['model_ema'])
        start_epoch, best = state['epoch'] + 1, state.get('best')
        _logger.info(f'resumed from {args.resume}: continuing at epoch {start_epoch}')
    if start_epoch > 0:
        scheduler.step(start_epoch)

    train_model = model
    if world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None)

    folder = os.path.join(args.output, args.experiment or args.model.replace('/', '_'))
    if _is_main():
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, 'args.yaml'), 'w') as f:
            yaml.safe_dump({k: v for k, v in vars(args).items()}, f)
        _logger.info(f'{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, '
                     f'{world_size} process(es) on {device.type}, global batch {lrs["global_batch"]}, '
                     f'lr {lrs["lr"]:.3e}, {describe_epochs(args, num_epochs)}, '
                     f'{data_config["input_size"][-2]}x{data_config["input_size"][-1]} px, output {folder}')

    for epoch in range(start_epoch, num_epochs):
        # every epoch draws from generators seeded by (seed, epoch, rank): a resumed run repeats them
        random_seed(args.seed + 1000 * (epoch + 1), rank)
        if hasattr(train_loader.sampler, 'set_epoch'):
            train_loader.sampler.set_epoch(epoch)
        start = time.time()
        train_loss = train_one_epoch(
            epoch, train_model, train_loader, optimizer, scheduler, loss_fn, args, device, world_size,
            mixup=mixup, scaler=scaler, ema=ema, amp_ctx=amp_ctx, num_epochs=num_epochs)
        scheduler.step(epoch + 1)
        row = {'epoch': epoch, 'train_loss': round(train_loss, 6), 'lr': optimizer.param_groups[0]['lr']}
        metrics = None
        if val_loader is not None:
            metrics = evaluate(model, val_loader, device, world_size, amp_ctx, args.channels_last)
            row.update({f'eval_{k}': round(v, 4) for k, v in metrics.items()})
            if ema is not None:
                ema_metrics = evaluate(ema.module, val_loader, device, world_size, amp_ctx, args.channels_last)
                row.update({f'ema_{k}': round(v, 4) for k, v in ema_metrics.items()})
        row['time_s'] = round(time.time() - start, 1)
        score = metrics['top1'] if metrics else -train_loss
        is_best = best is None or score > best
        best = score if is_best else best
        if _is_main():
            append_summary(folder, row)
            state = {
                'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                'scheduler': scheduler.state_dict(), 'scaler': scaler.state_dict() if scaler else None,
                'model_ema': ema.module.state_dict() if ema else None, 'epoch': epoch, 'best': best,
                'arch': args.model, 'num_classes': num_classes, **checkpoint_config,
                'args': {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))},
            }
            save_atomically(state, os.path.join(folder, 'last.pth.tar'))
            if is_best:
                save_atomically(state, os.path.join(folder, 'model_best.pth.tar'))
            _logger.info(' '.join(f'{k} {v}' for k, v in row.items()))

    checksum = check_ranks_in_sync(model, world_size)
    if _is_main():
        if world_size > 1:
            _logger.info(f'done: {world_size} rank(s) hold the same weights (checksum {checksum:.6f})')
        else:
            _logger.info(f'done: checkpoints in {folder}')
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == '__main__':
    sys.exit(main())
