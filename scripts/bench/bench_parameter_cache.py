""" Inference with and without the parameter cache of the focused linear attention layers, in one process.

The layers keep what they compute from their parameters (folded projections, summed depthwise kernels,
scaled key encoding) between inference calls; here the same modules run with the cache on and off in
turns (median of the medians of `--rounds` rounds), on small maps where that per-call work shows most.

    python scripts/bench/bench_parameter_cache.py [--rounds 7]
"""
import argparse
import statistics
import time

import timm
import torch

import flatten_timm  # noqa: F401  (registers the models)
from flatten_timm.layers import FocusedLinearAttention2d
from flatten_timm.layers.parameter_cache import ParameterCache


def _median_seconds(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare(label: str, fn, calls: int, rounds: int):
    active = ParameterCache.active
    times = {True: [], False: []}
    try:
        for _ in range(rounds):
            for cached in (False, True):
                ParameterCache.active = staticmethod(active if cached else (lambda: False))
                fn()  # a cached round starts filled
                times[cached].append(_median_seconds(fn, calls))
    finally:
        ParameterCache.active = staticmethod(active)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(f'| {label} | {off * 1e3:.3f} | {on * 1e3:.3f} | {off / on:.3f}x |', flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--rounds', type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, batch 1, no grad')
    print('| module, input | ms uncached | ms cached | speed-up |\n|---|---|---|---|')
    with torch.no_grad():
        for channels, size in ((256, 20), (128, 40), (64, 80)):
            layer = FocusedLinearAttention2d(channels, channels // 32, grid_size=size).eval()
            x = torch.randn(1, channels, size, size)
            compare(f'FocusedLinearAttention2d({channels}), {size}x{size} map', lambda: layer(x), 30, args.rounds)
        for name in ('flatten_pvt_v2_b0', 'flatten_pvt_tiny', 'flatten_swin_tiny_patch4_224',
                     'flatten_cswin_tiny_224'):
            model = timm.create_model(name).eval()
            x = torch.randn(1, 3, 224, 224)
            compare(f'{name}, 224', lambda: model(x), 5, args.rounds)


if __name__ == '__main__':
    main()
