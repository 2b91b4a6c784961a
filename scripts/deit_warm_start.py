""" Does a warm start from softmax weights help FLatten-DeiT? A small experiment on scikit-learn's digits.

    python scripts/deit_warm_start.py                       # the experiment, a markdown table on stdout
    python scripts/deit_warm_start.py --json results.json   # and the figures as JSON
    # a warm-start folder, the same as `flatten-timm convert --from-softmax` writes (its model.safetensors is
    # for scripts/train.py --initial-checkpoint, configs/deit/*_warm_start.yaml):
    python scripts/deit_warm_start.py --convert warm_start/ --model flatten_deit_tiny_patch16_224 \
        --softmax deit_tiny_patch16_224 [--softmax-checkpoint deit_tiny.pth]

The 8x8 digit images are upsampled to 16x16 and cut into 4x4 patches (a 4x4 grid of tokens and a class token).
A tiny softmax ViT
(timm's VisionTransformer) is trained for --softmax-epochs, converted with `warm_start_from_softmax` and fine-tuned
for --epochs; the same FLatten-DeiT is trained from scratch for the same --epochs, and for --softmax-epochs +
--epochs (as many steps as the softmax model and its fine-tune together). Test accuracy over --seeds seeds.
Needs scikit-learn (pip install scikit-learn).
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import flatten_timm  # noqa: E402,F401  registers the models
from flatten_timm.models.flatten_deit import warm_start_from_softmax  # noqa: E402

# the same ViT for both attentions: 4 blocks of 64 channels, 2 heads, 4x4 patches of a 16x16 image
ARCH = dict(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=2)


def digits(img_size: int = 16, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits upsampled (bilinear) to img_size, scaled to mean 0 / std 1: a fixed 75 / 25 split of
    the 1797 images (train 1347, test 450)."""
    from sklearn.datasets import load_digits
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.
    x = F.interpolate(x, size=(img_size, img_size), mode='bilinear', align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    split = len(y) * 3 // 4
    train, test = order[:split], order[split:]
    return x[train], y[train], x[test], y[test]


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, lr: float = 1e-3,
          batch_size: int = 64) -> torch.nn.Module:
    """AdamW with a cosine schedule over all steps, weight decay 0.05; the batches' order from `seed`."""
    if epochs == 0:
        return model
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps_per_epoch = -(-len(y) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for i in range(0, len(y), batch_size):
            batch = order[i:i + batch_size]
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(-1) == y).float().mean().item()


def flatten_deit(seed: int, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model('flatten_deit_tiny_patch16_224', **{**ARCH, **kwargs})


def softmax_vit(seed: int, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model('vit_tiny_patch16_224', **{**ARCH, **kwargs})


def run(seed: int, softmax_epochs: int, epochs: int, data) -> Dict[str, float]:
    x_train, y_train, x_test, y_test = data
    out = {}
    softmax = train(softmax_vit(seed), x_train, y_train, softmax_epochs, seed)
    out['softmax ViT'] = accuracy(softmax, x_test, y_test)

    warm = flatten_deit(seed)
    warm_start_from_softmax(warm, softmax)
    out['FLatten-DeiT, warm start, before fine-tuning'] = accuracy(warm, x_test, y_test)
    out['FLatten-DeiT, warm start + fine-tune'] = accuracy(train(warm, x_train, y_train, epochs, seed), x_test, y_test)
    scratch = train(flatten_deit(seed), x_train, y_train, epochs, seed)
    out['FLatten-DeiT from scratch, same epochs'] = accuracy(scratch, x_test, y_test)
    longer = train(flatten_deit(seed), x_train, y_train, softmax_epochs + epochs, seed)
    out['FLatten-DeiT from scratch, softmax + fine-tune epochs'] = accuracy(longer, x_test, y_test)
    return out


def convert(output: str, model_name: str, softmax_name: str, softmax_checkpoint: str = '') -> int:
    """`flatten-timm convert --from-softmax`: a folder (model.safetensors, config.json, README.md) holding
    `warm_start_from_softmax`'s result for `model_name` from timm's `softmax_name` (its pretrained weights, from the
    Hub or from softmax_checkpoint); says which keys are new."""
    if output.endswith(('.safetensors', '.pth')):
        raise SystemExit(f'--convert {output}: give a folder; it gets model.safetensors (the file for '
                         f'scripts/train.py --initial-checkpoint), config.json and README.md')
    from flatten_timm.cli import main as flatten_timm_cli
    return flatten_timm_cli(['convert', '--from-softmax', softmax_name, '--model', model_name, '--output', output]
                            + (['--checkpoint', softmax_checkpoint] if softmax_checkpoint else []))


def main(argv: List[str] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--softmax-epochs', type=int, default=30, help='epochs of the softmax ViT (default 30)')
    p.add_argument('--epochs', type=int, default=5, help='epochs of fine-tuning and of training from scratch '
                                                          '(default 5)')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2], help='seeds of init and batch order')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s)')
    p.add_argument('--json', default=None, help='write the figures as JSON here')
    p.add_argument('--convert', default=None, metavar='OUTPUT',
                   help='instead of the experiment, write a warm-start folder of --model from --softmax, as '
                        '`flatten-timm convert --from-softmax` does')
    p.add_argument('--model', default='flatten_deit_tiny_patch16_224', help='FLatten-DeiT to warm-start')
    p.add_argument('--softmax', default='deit_tiny_patch16_224', help="timm's softmax model of the same size")
    p.add_argument('--softmax-checkpoint', default='', help="its weights from this file (default: timm's download)")
    args = p.parse_args(argv)
    if args.convert:
        return convert(args.convert, args.model, args.softmax, args.softmax_checkpoint)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = digits(ARCH['img_size'])
    start = time.perf_counter()
    results = []
    for seed in args.seeds:
        results.append(run(seed, args.softmax_epochs, args.epochs, data))
        print(f'seed {seed} done ({time.perf_counter() - start:.0f} s): {results[-1]}', file=sys.stderr, flush=True)
    seconds = time.perf_counter() - start

    size = ARCH['img_size']
    print(f'digits (train {len(data[1])}, test {len(data[3])}), {size}x{size}, 4x4 patches, {ARCH["depth"]} blocks of '
          f'{ARCH["embed_dim"]}; softmax ViT {args.softmax_epochs} epochs, fine-tune / scratch {args.epochs}; '
          f'seeds {args.seeds}; {seconds:.0f} s\n')
    print('| model | ' + ' | '.join(f'seed {s}' for s in args.seeds) + ' | mean |')
    print('|---|' + '---|' * (len(args.seeds) + 1))
    for name in results[0]:
        values = [r[name] for r in results]
        cells = ' | '.join(f'{100 * v:.1f}' for v in values)
        print(f'| {name} | {cells} | {100 * statistics.mean(values):.1f} |')
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            arch=ARCH, softmax_epochs=args.softmax_epochs, epochs=args.epochs, seeds=args.seeds, seconds=seconds,
            torch=torch.__version__, timm=timm.__version__, test_accuracy=results), indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
