""" Throughput and memory of flatten models side by side with timm's softmax models of their size.

Every measurement of one run uses the same device, dtype, batch and timing method: warm-up
batches, then the median of timed batches, each ended by a device synchronisation. The official
FLatten code can be measured in the same run when its checkout is given (its model files are
imported without registering anything).
"""
import contextlib
import importlib.util
import io
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn

from ._optional import import_matplotlib
from .zoo import count_params_and_gmacs

_logger = logging.getLogger(__name__)

__all__ = ['SOFTMAX_PEERS', 'BenchResult', 'benchmark', 'cpu_peak_memory_mib', 'load_official_model', 'format_table',
           'parse_img_size', 'time_steps', 'write_json', 'write_plot']

# timm softmax-attention model of about the same size (timm has no PVT v1 nor CSWin)
SOFTMAX_PEERS = {
    'flatten_pvt_tiny': 'pvt_v2_b1', 'flatten_pvt_small': 'pvt_v2_b2', 'flatten_pvt_medium': 'pvt_v2_b3',
    'flatten_pvt_large': 'pvt_v2_b4',
    **{f'flatten_pvt_v2_b{i}': f'pvt_v2_b{i}' for i in range(6)},
    'flatten_swin_tiny_patch4_224': 'swin_tiny_patch4_window7_224',
    'flatten_swin_small_patch4_224': 'swin_small_patch4_window7_224',
    'flatten_swin_base_patch4_224': 'swin_base_patch4_window7_224',
    'flatten_swin_base_patch4_384': 'swin_base_patch4_window12_384',
    'flatten_cswin_tiny_224': 'swin_tiny_patch4_window7_224',
    'flatten_cswin_small_224': 'swin_small_patch4_window7_224',
    'flatten_cswin_base_224': 'swin_base_patch4_window7_224', 'flatten_cswin_base_384': 'swin_base_patch4_window12_384',
    **{f'flatten_deit_{size}_patch16_224': f'deit_{size}_patch16_224' for size in ('tiny', 'small', 'base')},
}

# how the official code builds the released layouts: (file, factory, kwargs of its configs)
_LA = dict(focusing_factor=3, kernel_size=5)
OFFICIAL_BUILDERS = {
    'flatten_pvt_tiny': ('flatten_pvt', 'flatten_pvt_tiny', dict(_LA, attn_type='LLLL', la_sr_ratios='1111')),
    'flatten_pvt_v2_b0': ('flatten_pvt_v2', 'flatten_pvt_v2_b0', dict(_LA, attn_type='LLLL', la_sr_ratios='1111')),
    'flatten_pvt_v2_b1': ('flatten_pvt_v2', 'flatten_pvt_v2_b1', dict(_LA, attn_type='LLLL', la_sr_ratios='1111')),
    'flatten_swin_tiny_patch4_224': ('flatten_swin', 'FLattenSwinTransformer', dict(
        _LA, img_size=224, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=56,
        attn_type='LLSS')),
    'flatten_cswin_tiny_224': ('flatten_cswin', 'FLatten_CSWin_64_24181_tiny_224', dict(
        _LA, attn_type='LLSS', la_split_size='56-28-14-7')),
}


OFFICIAL_IMG_SIZE = 224  # the official models only run at the resolution they are built for


@dataclass
class BenchResult:
    model: str
    kind: str  # 'flatten', 'softmax peer' or 'official'
    flatten_model: str  # the flatten model this row is compared with
    img_size: str  # '224', or 'HxW' when not square
    batch_size: int
    dtype: str
    mode: str
    params_m: float
    gmacs: float
    img_per_s: float
    ms_per_batch: float
    peak_mib: Optional[float]
    ratio_vs_flatten: Optional[float] = None
    features_only: bool = False
    extra: Dict = field(default_factory=dict)


def load_official_model(name: str, official_repo: str, img_size: int) -> nn.Module:
    """Build the official implementation of `name` from a checkout of LeapLabTHU/FLatten-Transformer."""
    if name not in OFFICIAL_BUILDERS:
        raise KeyError(f'no official builder for {name}; known: {", ".join(OFFICIAL_BUILDERS)}')
    file, factory, kwargs = OFFICIAL_BUILDERS[name]
    path = os.path.join(official_repo, 'models', f'{file}.py')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path} not found: --official-repo must be a FLatten-Transformer checkout')
    # the official files import timm's deprecated paths and print while building: keep the output clean
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter('ignore', FutureWarning)
        import timm.models
        import timm.models.registry
        saved = timm.models.register_model, timm.models.registry.register_model
        timm.models.register_model = timm.models.registry.register_model = lambda fn: fn  # keep the registry ours
        try:
            spec = importlib.util.spec_from_file_location(f'official_{file}', path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        finally:
            timm.models.register_model, timm.models.registry.register_model = saved
        if 'img_size' in kwargs:
            kwargs = dict(kwargs, img_size=img_size)
        return getattr(module, factory)(**kwargs)


Size = Tuple[int, int]


def parse_img_size(value) -> Size:
    """224 -> (224, 224); '800x1344' -> (800, 1344) (height x width)."""
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    text = str(value).lower()
    try:
        h, w = text.split('x') if 'x' in text else (text, text)
        size = int(h), int(w)
    except ValueError:
        raise ValueError(f'image size {value!r}: give one number (224) or HEIGHTxWIDTH (800x1344)') from None
    if min(size) < 1:
        raise ValueError(f'image size {value!r} must be positive')
    return size


def size_label(size: Size) -> str:
    return str(size[0]) if size[0] == size[1] else f'{size[0]}x{size[1]}'


def _build(model_name: str, kind: str, img_size: Size, official_repo: Optional[str], features_only: bool
           ) -> nn.Module:
    if kind == 'official':
        return load_official_model(model_name, official_repo, img_size[0])
    kwargs = {'features_only': True} if features_only else {}
    if kind == 'softmax peer' and 'swin' in model_name:
        kwargs['img_size'] = img_size  # timm's Swin fixes its window layout at construction
    if kind == 'softmax peer' and model_name.startswith('deit_'):
        kwargs['dynamic_img_size'] = True  # as FLatten-DeiT: any size, the position embedding resampled
    return timm.create_model(model_name, **kwargs)


def _sync(device: torch.device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _make_step(model: nn.Module, x: torch.Tensor, dtype: str, mode: str, device: torch.device):
    """One inference batch or training step of `model` on the images `x` as a closure (compiled in 'compile'
    mode)."""
    amp = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(dtype)
    model = model.to(device)
    if mode == 'compile':
        model = torch.compile(model)
    train = mode == 'train'
    model.train(train)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6) if train else None

    def loss_of(out):  # a classifier's logits, or the feature maps of features_only
        outs = out if isinstance(out, (list, tuple)) else [out]
        return sum(o.float().mean() for o in outs)

    def step():
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            if train:
                loss = loss_of(model(x))
            else:
                with torch.no_grad():
                    model(x)
        if train:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def _images(batch_size: int, img_size: Size, device: torch.device) -> torch.Tensor:
    return torch.randn(batch_size, 3, *img_size, device=device)


_HOST_MEMORY = (torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.MKLDNN, torch.autograd.DeviceType.IDEEP)


def _allocated_peak_bytes(profiler) -> int:
    """The highest sum of the host allocations a `torch.profiler.profile(profile_memory=True)` saw, from zero at
    its start: each allocation and free in time order (a free of a tensor from before the start lowers the sum)."""
    events = sorted(((e.start_ns(), e.nbytes()) for e in profiler.profiler.kineto_results.events()
                     if e.name() == '[memory]' and e.device_type() in _HOST_MEMORY), key=lambda event: event[0])
    if not events:  # every step allocates: no events means this build's profiler records none
        raise RuntimeError("torch's profiler recorded no allocations")
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak


@contextlib.contextmanager
def _native_stderr_silenced():
    """The process's stderr (file descriptor 2) sent to /dev/null: the profiler's native library prints a line at
    every start and stop that no option turns off. (The steps it traces have run before: their warnings have
    been shown.)"""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to silence
        yield
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(devnull)
    finally:
        os.close(saved)


def cpu_peak_memory_mib(contender: Tuple[str, str], img_size: Size, batch_size: int, dtype: str = 'fp32',
                        mode: str = 'infer', official_repo: Optional[str] = None, features_only: bool = False
                        ) -> Optional[float]:
    """Peak memory (MiB) of a (model name, kind) contender's steps on the CPU, as CUDA's max_memory_allocated
    counts it: the bytes of tensors held at the highest point, the weights, the input and everything two steps
    allocate (caches the first one keeps included).

    The model is built afresh and its steps' allocations and frees are read from torch's profiler (in compile
    mode, after one step that compiles). Like CUDA's figure it leaves out what the allocator keeps of freed memory
    (glibc's heap, whose resident pages varied by 25 MiB between identical runs of one model) and the libraries'
    code and own buffers. None, with a warning, where the steps fail or this build of torch's profiler records no
    allocations.
    """
    try:
        torch.manual_seed(0)
        model = _build(*contender, img_size, official_repo, features_only)
        x = _images(batch_size, img_size, torch.device('cpu'))
        step = _make_step(model, x, dtype, mode, torch.device('cpu'))
        tensors = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                   for t in (*model.parameters(), *model.buffers(), x)}
        if mode == 'compile':
            step()  # compiling allocates what no later call does (and compiled calls keep no caches)
        with _native_stderr_silenced(), torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            step()  # the first step's one-time allocations (caches kept for the next calls) count too
            step()
        return (sum(tensors.values()) + _allocated_peak_bytes(prof)) / 2 ** 20
    except Exception as e:  # the others are measured without this figure
        _logger.warning(f'peak memory of {contender[0]} at {size_label(img_size)} not measured: '
                        f'{type(e).__name__}: {e}')
        return None


def time_steps(steps: Sequence[Callable[[], None]], device: torch.device, warmup: int = 3, repeats: int = 10,
               progress: Optional[Callable[[str], None]] = None, names: Optional[Sequence[str]] = None,
               ) -> List[Dict[str, Optional[float]]]:
    """Median seconds per step and peak memory (MiB, CUDA only) of each step, timed alternately.

    Every step is warmed up, its peak memory read over one more step, then the timed repeats take
    turns (a, b, c, a, b, c, ...), so slow drifts of the machine hit every contender alike.
    progress(text), if given, is told what is being run (the steps by their names).
    """
    names = list(names or (f'step {i}' for i in range(len(steps))))
    peaks = []
    for name, step in zip(names, steps):
        if progress is not None:
            progress(f'  warming up {name} ({warmup} batch{"es" if warmup != 1 else ""})')
        for _ in range(warmup):
            step()
        _sync(device)
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)
            step()
            _sync(device)
            peaks.append(torch.cuda.max_memory_allocated(device) / 2 ** 20)
        else:
            peaks.append(None)
    times = [[] for _ in steps]
    if progress is not None:
        progress(f'  timing {repeats} batch{"es" if repeats != 1 else ""} of each, in turns')
    for _ in range(repeats):
        for i, step in enumerate(steps):
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times[i].append(time.perf_counter() - start)
    return [{'seconds': statistics.median(t), 'peak_mib': peak} for t, peak in zip(times, peaks)]


def _measure(name, contenders, img_size: Size, batch_size, dtype, mode, device, official_repo, warmup, repeats,
             features_only, progress=None, cpu_memory: bool = False) -> List[BenchResult]:
    """One row per contender, timed in turns; ratio_vs_flatten = flatten img/s / contender img/s."""
    built, counts = [], []
    for model_name, kind in contenders:
        torch.manual_seed(0)
        model = _build(model_name, kind, img_size, official_repo, features_only)
        if kind == 'official':  # its constructors need real tensors
            counts.append(count_params_and_gmacs(model, (3, *img_size)))
        else:
            with torch.device('meta'):  # counting on the meta device costs nothing
                counts.append(count_params_and_gmacs(
                    _build(model_name, kind, img_size, official_repo, features_only), (3, *img_size)))
        built.append(_make_step(model, _images(batch_size, img_size, device), dtype, mode, device))
    names = [model_name if kind != 'official' else f'official {model_name}' for model_name, kind in contenders]
    timings = time_steps(built, device, warmup, repeats, progress=progress, names=names)
    if cpu_memory and device.type == 'cpu':
        if progress is not None:
            progress('  peak memory: each model built again, its allocations traced over two steps')
        for contender, timing in zip(contenders, timings):
            timing['peak_mib'] = cpu_peak_memory_mib(contender, img_size, batch_size, dtype, mode, official_repo,
                                                     features_only)
    rows = []
    for (model_name, kind), (params_m, gmacs), timing in zip(contenders, counts, timings):
        rows.append(BenchResult(
            model=model_name if kind != 'official' else f'official {model_name}', kind=kind,
            flatten_model=name, img_size=size_label(img_size), batch_size=batch_size, dtype=dtype,
            mode=mode, params_m=round(params_m, 2), gmacs=round(gmacs, 2),
            img_per_s=round(batch_size / timing['seconds'], 2),
            ms_per_batch=round(timing['seconds'] * 1e3, 2),
            peak_mib=round(timing['peak_mib'], 1) if timing['peak_mib'] is not None else None,
            features_only=features_only))
        _logger.info(f'{rows[-1].model} {rows[-1].img_size}px {mode}: {rows[-1].img_per_s} img/s')
    for row, timing in zip(rows, timings):  # from the unrounded times
        row.ratio_vs_flatten = round(timing['seconds'] / timings[0]['seconds'], 3)
    if progress is not None:
        progress('  ' + ', '.join(f'{r.model} {r.img_per_s:.1f} img/s' for r in rows))
    return rows


def benchmark(models: Sequence[str], img_sizes: Sequence = (224,), batch_size: int = 32, dtype: str = 'fp32',
              modes: Sequence[str] = ('infer',), device: str = 'cpu', peers: bool = True,
              official_repo: Optional[str] = None, warmup: int = 3, repeats: int = 10,
              features_only: bool = False, progress: Optional[Callable[[str], None]] = None,
              cpu_memory: bool = True) -> List[BenchResult]:
    """Measure each flatten model, its softmax peer and (with official_repo) the official code, side by side.

    img_sizes: 224 or (800, 1344) / '800x1344'; features_only: the backbones as detectors use them.
    Peak memory: CUDA's max_memory_allocated over a step, every contender of the group resident; on a CPU
    (cpu_memory) `cpu_peak_memory_mib`, the count for the contender alone, from torch's profiler.
    progress(text), if given, is told what is being measured as it starts: '[n/m] model beside peer at size, ...'.
    """
    device = torch.device(device)
    if device.type == 'cuda':
        # cuDNN's attention backward fails on some shapes of timm's pvt_v2 (torch 2.11, H200: "mha_graph.execute"):
        # every contender runs SDPA's other fused kernels instead
        torch.backends.cuda.enable_cudnn_sdp(False)
    results = []
    for name in models:
        if not timm.is_model(name):
            raise ValueError(f'unknown model {name!r}')
    img_sizes = [parse_img_size(size) for size in img_sizes]
    total, group = len(models) * len(img_sizes) * len(modes), 0
    for name in models:
        for img_size in img_sizes:
            contenders = [(name, 'flatten')]
            if peers and name in SOFTMAX_PEERS:
                contenders.append((SOFTMAX_PEERS[name], 'softmax peer'))
            if official_repo and name in OFFICIAL_BUILDERS:
                if img_size == (OFFICIAL_IMG_SIZE, OFFICIAL_IMG_SIZE) and not features_only:
                    contenders.append((name, 'official'))
                else:
                    _logger.warning(f'the official code runs only as a {OFFICIAL_IMG_SIZE}px classifier: '
                                    f'not measured at {size_label(img_size)}'
                                    f'{" features_only" if features_only else ""}')
            for mode in modes:
                group += 1
                if progress is not None:
                    others = [m if kind != 'official' else 'the official code' for m, kind in contenders[1:]]
                    progress(f'[{group}/{total}] {name}' + (f' beside {", ".join(others)}' if others else '') +
                             f' at {size_label(img_size)}{" features_only" if features_only else ""}, {mode}, '
                             f'{dtype}, batch {batch_size} on {device}')
                try:
                    rows = _measure(name, contenders, img_size, batch_size, dtype, mode, device, official_repo,
                                    warmup, repeats, features_only, progress, cpu_memory)
                except Exception as e:  # one failing group (e.g. a backend error of a peer) spoils no others
                    _logger.error(f'{name} {size_label(img_size)} {dtype} {mode}: not measured, '
                                  f'{type(e).__name__}: {e}')
                    continue
                results.extend(rows)
    return results


def environment(device: str) -> Dict[str, str]:
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else (platform.processor() or 'cpu')
    return {
        'device': f'{name} ({torch.get_num_threads()} threads)' if device.type == 'cpu' else name,
        'torch': torch.__version__, 'timm': timm.__version__,
        'date': datetime.now(timezone.utc).strftime('%Y-%m-%d'),
    }


def format_table(results: List[BenchResult]) -> str:
    header = ('| model | kind | size | batch | dtype | mode | params (M) | GMACs | img/s | peak MiB | '
              'flatten speed-up |')
    lines = [header, '|' + '---|' * (header.count('|') - 1)]
    for r in results:
        peak = f'{r.peak_mib:.0f}' if r.peak_mib is not None else '-'
        ratio = '' if r.kind == 'flatten' else f'{r.ratio_vs_flatten:.2f}x'
        mode = f'{r.mode} (features)' if r.features_only else r.mode
        lines.append(f'| {r.model} | {r.kind} | {r.img_size} | {r.batch_size} | {r.dtype} | {mode} | '
                     f'{r.params_m:.2f} | {r.gmacs:.2f} | {r.img_per_s:.1f} | {peak} | {ratio} |')
    return '\n'.join(lines)


def write_json(results: List[BenchResult], path: str, device: str):
    with open(path, 'w') as f:
        json.dump({'environment': environment(device), 'results': [asdict(r) for r in results]}, f, indent=1)


def _pixels(label: str) -> int:
    h, w = parse_img_size(label)
    return h * w


def write_plot(results: List[BenchResult], path: str, device: str):
    """Images per second against resolution, one line per model and mode."""
    plt = import_matplotlib()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    series: Dict[str, List[BenchResult]] = {}
    for r in results:
        series.setdefault(f'{r.model} ({r.mode}, {r.dtype})', []).append(r)
    for label, rows in series.items():
        rows = sorted(rows, key=lambda r: _pixels(r.img_size))
        style = '-' if rows[0].kind == 'flatten' else ('--' if rows[0].kind == 'softmax peer' else ':')
        ax.plot([_pixels(r.img_size) ** 0.5 for r in rows], [r.img_per_s for r in rows], style, marker='o',
                label=label)
    ax.set_xlabel('image size (px, square root of H x W)')
    ax.set_ylabel('images / s')
    ax.set_yscale('log')
    env = environment(device)
    ax.set_title(f"{env['device']}, torch {env['torch']}, {env['date']}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
