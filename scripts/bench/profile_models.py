""" Where a forward's time goes, per part of the model and per kernel, for FLatten models beside their peers.

Each model runs inference on one batch (bf16 autocast by default) under torch.profiler. Every module of a
known kind is a range (the outermost of its kind: a norm inside an attention counts as attention), so each
kernel's device time is charged to the part that launched it; `other` is what runs outside them (residual
adds, reshapes between parts, the head). On a CPU the times are the ops' CPU times. Beside them, a step's wall
time without the profiler and the host's time to issue it: on a GPU, whether the host or the GPU sets the pace.

    python scripts/bench/profile_models.py flatten_pvt_v2_b0 pvt_v2_b0 --img-size 224 -b 128 --dtype bf16 --device cuda
"""
import argparse
import json
import statistics
import time
from typing import Dict, List

import timm
import torch
from torch.profiler import ProfilerActivity, profile, record_function

import flatten_timm  # noqa: F401  (registers the models)

# (part, class-name fragments), first match wins
PARTS = (('attention', ('Attention',)), ('mlp', ('Mlp',)), ('embed', ('Embed', 'Merging', 'Downsample')),
         ('norm', ('Norm',)))
STEP = 'profile:step'


def part_of(module: torch.nn.Module):
    name = type(module).__name__
    return next((part for part, fragments in PARTS if any(f in name for f in fragments)), None)


def annotate(model: torch.nn.Module) -> List:
    """Wrap the outermost module of every part in a profiler range; returns the hook handles."""
    handles, inside = [], []
    for name, module in model.named_modules():
        part = part_of(module)
        if part is None or any(name.startswith(prefix + '.') for prefix in inside):
            continue
        inside.append(name)
        ranges = []
        handles.append(module.register_forward_pre_hook(
            lambda m, args, part=part, ranges=ranges: ranges.append(record_function(f'part:{part}').__enter__())))
        handles.append(module.register_forward_hook(
            lambda m, args, out, ranges=ranges: ranges.pop().__exit__(None, None, None)))
    return handles


def _total(row, device: str) -> float:
    if device == 'cuda':
        return getattr(row, 'device_time_total', None) or getattr(row, 'cuda_time_total', 0.)
    return row.cpu_time_total


def _self_total(row, device: str) -> float:
    if device == 'cuda':
        return getattr(row, 'self_device_time_total', None) or getattr(row, 'self_cuda_time_total', 0.)
    return row.self_cpu_time_total


def _synchronize(device: str):
    if device == 'cuda':
        torch.cuda.synchronize()


def profile_model(name: str, img_size: int, batch_size: int, dtype: str, device: str, steps: int = 3,
                  top: int = 12) -> Dict:
    """ms per step of each part and of the `top` kernels (CPU ops on a CPU), averaged over `steps`."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval().to(device)
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    amp = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(dtype)

    def step():
        with torch.no_grad(), torch.autocast(device, dtype=amp or torch.float32, enabled=amp is not None):
            model(x)

    for _ in range(3):  # warm-up: attn_impl='auto' times its candidates, Triton compiles
        step()
    wall_ms, host_ms = wall_and_host_ms(step, device)
    handles = annotate(model)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == 'cuda' else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            with record_function(STEP):
                step()
        _synchronize(device)
    for handle in handles:
        handle.remove()
    # the ranges' own CPU events (on CUDA the profiler adds spans of the same name on the GPU's timeline)
    totals: Dict[str, float] = {}
    for event in prof.events():
        if event.name.startswith(('part:', 'profile:')) and event.device_type.name == 'CPU':
            totals[event.name] = totals.get(event.name, 0.) + _total(event, device) / 1e3 / steps
    parts = {part: round(totals.get(f'part:{part}', 0.), 3) for part, _ in PARTS}
    rows = prof.key_averages()
    if device == 'cuda':  # every kernel of the steps, whether in a range or not
        step_ms = sum(_self_total(row, device) for row in rows if row.device_type.name == 'CUDA'
                      and not row.key.startswith(('part:', 'profile:'))) / 1e3 / steps
    else:
        step_ms = totals[STEP]
    parts['other'] = round(step_ms - sum(parts.values()), 3)
    ops = [row for row in rows if not row.key.startswith(('part:', 'profile:'))
           and (device != 'cuda' or row.device_type.name == 'CUDA')]
    ops.sort(key=lambda row: _self_total(row, device), reverse=True)
    kernels = [{'name': row.key, 'ms': round(_self_total(row, device) / 1e3 / steps, 3),
                'calls': row.count // steps} for row in ops[:top]]
    return {'model': name, 'img_size': img_size, 'batch_size': batch_size, 'dtype': dtype, 'device': device,
            'step_ms': round(step_ms, 3), 'wall_ms': round(wall_ms, 3), 'host_ms': round(host_ms, 3),
            'parts_ms': parts, 'top_kernels': kernels}


def wall_and_host_ms(step, device: str, repeats: int = 5):
    """Median ms of a step, without the profiler: wall time to its end (synchronised), and the host's time to
    issue it (until the call returns, before the synchronisation). On a GPU, a host time near the wall time
    and above the kernels' device time means the host's per-launch work sets the pace, not the GPU."""
    walls, hosts = [], []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        step()
        issued = time.perf_counter()
        _synchronize(device)
        walls.append(time.perf_counter() - start)
        hosts.append(issued - start)
    return statistics.median(walls) * 1e3, statistics.median(hosts) * 1e3


def to_markdown(reports: List[Dict]) -> str:
    r0 = reports[0]
    measure = 'device time of the kernels' if r0['device'] == 'cuda' else 'CPU time of the ops'
    lines = [f"ms per step ({r0['device']}, {r0['dtype']}, {r0['img_size']} px, batch {r0['batch_size']}; "
             f"{measure} each part launched; wall: a step's time without the profiler, host: the time to issue "
             f"it)", '',
             '| model | wall | host | step | ' + ' | '.join(part for part in reports[0]['parts_ms']) + ' |',
             '|---' * (4 + len(r0['parts_ms'])) + '|']
    for r in reports:
        lines.append(f"| {r['model']} | {r['wall_ms']:.2f} | {r['host_ms']:.2f} | {r['step_ms']:.2f} | " + ' | '.join(
            f'{v:.2f}' for v in r['parts_ms'].values()) + ' |')
    for r in reports:
        lines += ['', f"{r['model']}: top kernels (ms per step, calls per step)", '']
        lines += [f"- {k['ms']:.3f} ms, {k['calls']}x: `{k['name'][:110]}`" for k in r['top_kernels']]
    return '\n'.join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('models', nargs='+')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('-b', '--batch-size', type=int, default=128)
    parser.add_argument('--dtype', default='bf16', choices=('bf16', 'fp16', 'fp32'))
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--steps', type=int, default=3)
    parser.add_argument('--json', default=None, help='also write the reports here')
    args = parser.parse_args()
    reports = []
    for name in args.models:
        try:
            reports.append(profile_model(name, args.img_size, args.batch_size, args.dtype, args.device, args.steps))
        except Exception as e:  # one model that fails is reported, the others are profiled
            print(f'{name}: not profiled, {type(e).__name__}: {e}')
            continue
        print(f"{name}: {reports[-1]['step_ms']:.2f} ms per step", flush=True)
    if reports:
        print(to_markdown(reports))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(reports, f, indent=1)


if __name__ == '__main__':
    main()
