""" The `flatten-timm` command line.

Results go to stdout; what a long command is doing (n of m) goes to stderr.
"""
import argparse
import json
import logging
import os
import sys
import urllib.error
from typing import List, Optional

__all__ = ['main']


def _progress(text: str):
    print(text, file=sys.stderr, flush=True)


def _cmd_models(args) -> int:
    from .zoo import describe_model, filter_models, list_flatten_models
    names = filter_models(list_flatten_models(), args.filter)
    if not names:
        print(f'no flatten model matches {args.filter!r}', file=sys.stderr)
        return 1
    entries = [describe_model(n) for n in names]
    if args.json:
        print(json.dumps([e.__dict__ for e in entries], indent=1))
        return 0
    header = f"{'model':<32} {'size':>5} {'params (M)':>11} {'GMACs':>7} {'top-1 (released)':>17}"
    print(header)
    print('-' * len(header))
    for e in entries:
        top1 = f'{e.top1:.1f}' if e.top1 is not None else '-'
        print(f'{e.name:<32} {e.img_size:>5} {e.params_m:>11.2f} {e.gmacs:>7.2f} {top1:>17}')
    return 0


def _cmd_convert(args) -> int:
    from .hub import convert_checkpoint, convert_from_softmax, describe_warm_start, push_folder_to_hub
    if args.from_softmax:
        _progress(f'{args.model} from the softmax weights of {args.from_softmax} ('
                  + (args.checkpoint if args.checkpoint else "timm's download") + ')')
        try:
            folder, report = convert_from_softmax(args.model, args.from_softmax, args.output,
                                                  checkpoint=args.checkpoint, key=args.key,
                                                  repo_name=args.push_to_hub, license=args.license)
        except ValueError as e:  # models that do not fit each other, an unknown name, a file of another model
            print(f'flatten-timm convert: error: {e}', file=sys.stderr)
            return 2
        print(describe_warm_start(report, args.model, args.from_softmax))
    elif not args.checkpoint:
        print('flatten-timm convert: error: --checkpoint FILE is required (or --from-softmax SOFTMAX_MODEL to '
              'warm-start a FLatten-DeiT)', file=sys.stderr)
        return 2
    else:
        folder = convert_checkpoint(args.model, args.checkpoint, args.output, key=args.key,
                                    repo_name=args.push_to_hub, license=args.license)
    print(f'wrote {folder}: ' + ', '.join(sorted(p.name for p in folder.iterdir())))
    if args.push_to_hub:
        print(f'uploaded to {push_folder_to_hub(folder, args.push_to_hub, private=args.private)}')
    return 0


def _class_names(model) -> List[str]:
    label_names = model.pretrained_cfg.get('label_names')
    if label_names and len(label_names) == model.num_classes:
        return list(label_names)
    if model.num_classes == 1000:
        from timm.data import ImageNetInfo
        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(1000)]
    return [f'class {i}' for i in range(model.num_classes)]


def _load_model(args, features_only: bool = False):
    """ The model of --model with the weights of --pretrained or --checkpoint, in eval mode.

    A checkpoint that records how it was trained (input size, crop, mean/std, class names) gives the model
    that size and data config (flatten_timm.hub.load_checkpoint_config).
    """
    import timm
    from .hub import create_model_as_trained, load_checkpoint_config, model_kwargs_from_config
    if args.checkpoint and features_only:  # timm's pretrained path loads it without the head
        if not os.path.isfile(args.checkpoint):
            raise FileNotFoundError(f'checkpoint file not found: {args.checkpoint}')
        kwargs = model_kwargs_from_config(args.model, load_checkpoint_config(args.checkpoint), {})
        kwargs.pop('num_classes', None)
        kwargs['pretrained_cfg_overlay'] = dict(kwargs.get('pretrained_cfg_overlay', {}), file=args.checkpoint)
        return timm.create_model(args.model, pretrained=True, features_only=True, **kwargs).eval()
    if args.checkpoint:
        return create_model_as_trained(args.model, args.checkpoint).eval()
    if not args.pretrained:
        logging.getLogger(__name__).warning('neither --pretrained nor --checkpoint: using random weights')
    return timm.create_model(args.model, pretrained=args.pretrained, features_only=features_only).eval()


def _check_image_file(path: str):
    if not os.path.exists(path):
        raise SystemExit(f'cannot read image {path}: no such file')
    if os.path.isdir(path):
        raise SystemExit(f'cannot read image {path}: it is a folder; give image files')


def _read_image(path: str):
    from PIL import Image, UnidentifiedImageError
    _check_image_file(path)
    try:
        return Image.open(path).convert('RGB')
    # ImportError: with Ultralytics imported, Image.open retries undecodable files with an optional HEIF plugin
    except (UnidentifiedImageError, OSError, ImportError) as e:
        raise SystemExit(f'cannot read image {path}: not an image file Pillow can decode ({e})')


def _data_config(model) -> dict:
    import timm
    return timm.data.resolve_data_config({}, model=model)


def _eval_transform(model):
    import timm
    return timm.data.create_transform(**_data_config(model))


def _check_model_name(name: str):
    """An unknown name fails as timm.create_model fails for it, before anything is read or built."""
    import timm
    if not (name.startswith(('hf-hub:', 'local-dir:')) or timm.is_model(name)):
        raise RuntimeError(f'Unknown model ({name})')


def _cmd_predict(args) -> int:
    import torch
    _check_model_name(args.model)
    for path in args.images:  # before the model is built
        _check_image_file(path)
    model = _load_model(args)
    transform = _eval_transform(model)
    names = _class_names(model)
    for path in args.images:
        with torch.inference_mode():
            probs = model(transform(_read_image(path)).unsqueeze(0)).softmax(-1)[0]
        top = probs.topk(min(args.topk, probs.numel()))
        print(path)
        for p, i in zip(top.values.tolist(), top.indices.tolist()):
            print(f'  {p:7.2%}  {names[i]}')
    return 0


def _point(text: str):
    try:
        x, y = (int(float(v)) for v in text.split(','))
    except ValueError:
        raise argparse.ArgumentTypeError(f'a point is x,y in pixels of the model input, got {text!r}')
    return x, y


def _cmd_visualize(args) -> int:
    import torch
    from ._optional import import_matplotlib
    from .attention_maps import capture_attention, draw_attention_figure, find_linear_attention
    import_matplotlib()  # before any work: the figure needs it
    _check_model_name(args.model)
    _check_image_file(args.image)
    model = _load_model(args)
    config = _data_config(model)
    x = _eval_transform(model)(_read_image(args.image)).unsqueeze(0)
    name, layer = find_linear_attention(model, args.stage, args.block)
    if not 0 <= args.head < layer.num_heads:
        raise SystemExit(f'--head {args.head}: {name} has {layer.num_heads} heads')
    with capture_attention(model, layer) as captured, torch.inference_mode():
        model(x)
    if captured[0].q.shape[0] != 1:
        raise SystemExit(f'{name} attends within windows smaller than the map; pick a layer with global attention')
    mean = torch.tensor(config['mean']).view(3, 1, 1)
    std = torch.tensor(config['std']).view(3, 1, 1)
    image = x[0] * std + mean
    H, W = image.shape[-2:]
    points = args.points or [(W // 2, H // 2)]
    title = f'{args.model}: {name} (head {args.head}), input {W}x{H}'
    draw_attention_figure(image, captured[0], points, head=args.head, title=title, output=args.output)
    print(f'wrote {args.output}')
    return 0


def _cmd_bench(args) -> int:
    from .benchmark import benchmark, format_table, write_json, write_plot
    args.device = args.device or ('cuda' if _cuda_available() else 'cpu')
    results = benchmark(args.models, img_sizes=args.img_size, batch_size=args.batch_size, dtype=args.dtype,
                        modes=args.mode, device=args.device, peers=not args.no_peers,
                        official_repo=args.official_repo, warmup=args.warmup, repeats=args.repeats,
                        features_only=args.features_only, progress=_progress, cpu_memory=not args.no_memory)
    print(format_table(results))
    if args.json:
        write_json(results, args.json, args.device)
        print(f'wrote {args.json}')
    if args.plot:
        write_plot(results, args.plot, args.device)
        print(f'wrote {args.plot}')
    return 0


def _cmd_export(args) -> int:
    from .export import check_onnx, default_check_sizes, export_onnx, model_min_input_size
    model = _load_model(args, features_only=args.features_only)
    img_size = tuple(args.img_size) if args.img_size else tuple(model.pretrained_cfg['input_size'][-2:])
    what = 'backbone' if args.features_only else 'classifier'
    _progress(f'exporting the {args.model} {what} at {img_size[0]}x{img_size[1]} with the {args.exporter} exporter'
              + (' (20-60 s)' if args.exporter == 'dynamo' else ''))
    path = export_onnx(model, args.output, img_size=img_size, dynamic=args.dynamic, exporter=args.exporter,
                       opset=args.opset)
    axes = 'dynamic batch, height and width' if args.dynamic else f'fixed size 1x3x{img_size[0]}x{img_size[1]}'
    print(f'wrote {path} ({args.exporter} exporter, {axes}); onnx.checker passed')
    sizes = default_check_sizes(img_size, model_min_input_size(model)) if args.dynamic else [img_size]
    _progress(f'running it in ONNX Runtime beside PyTorch at {len(sizes)} size{"s" if len(sizes) > 1 else ""}')
    print('ONNX Runtime vs PyTorch, random input:')
    for check in check_onnx(path, model, sizes, batch_size=2 if args.dynamic else 1):
        shapes = ', '.join('x'.join(map(str, s)) for s in check.output_shapes)
        print(f'  {check.batch_size}x{check.img_size[0]}x{check.img_size[1]}: max |difference| '
              f'{check.max_abs_diff:.2e}  (outputs {shapes})')
    return 0


def _image_size(value: str):
    from .benchmark import parse_img_size
    try:
        return parse_img_size(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def _add_model_arguments(parser: argparse.ArgumentParser):
    """--model and its weights (--pretrained or --checkpoint), as _load_model reads them."""
    parser.add_argument('--model', required=True, help="model name, or 'hf-hub:OWNER/NAME'")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument('--pretrained', action='store_true', help='use the pretrained weights of the model')
    weights.add_argument('--checkpoint', default=None, help='weights file (official .pth or .safetensors)')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='flatten-timm', description='FLatten Transformer backbones for timm.')
    parser.add_argument('-v', '--verbose', action='store_true', help='log what happens')
    sub = parser.add_subparsers(dest='command', required=True)
    models = sub.add_parser('models', help='list the model zoo: params, GMACs, released top-1')
    models.add_argument('--filter', default='', metavar='PATTERN',
                        help="only names matching this wildcard pattern, as timm.list_models matches them "
                             "('swin_*_384'); the flatten_ prefix may be left out, and a pattern without "
                             "wildcards matches names that start with it ('swin_base': Swin-B, not CSWin-B)")
    models.add_argument('--json', action='store_true', help='print JSON instead of a table')
    models.set_defaults(func=_cmd_models)

    convert = sub.add_parser('convert', help='convert an official checkpoint into a timm Hub folder, or '
                                             'warm-start a FLatten-DeiT from softmax weights (--from-softmax)')
    convert.add_argument('--model', required=True, help='flatten_* model name, e.g. flatten_pvt_tiny')
    convert.add_argument('--checkpoint', default=None,
                         help="official .pth (or this project's file); with --from-softmax, the softmax model's "
                              "weights (.pth or .safetensors) instead of timm's download")
    convert.add_argument('--from-softmax', metavar='SOFTMAX_MODEL', default=None,
                         help="warm-start --model (a flatten_deit_* model) from this timm softmax model's weights "
                              '(e.g. deit_small_patch16_224): an initialisation for fine-tuning, not a trained '
                              'classifier')
    convert.add_argument('--output', required=True, help='folder to write model.safetensors, config.json, README.md')
    convert.add_argument('--key', default=None, help="checkpoint entry to take: 'model' (default) or 'model_ema'")
    convert.add_argument('--license', default='other', help='license for the model card (default: other)')
    convert.add_argument('--push-to-hub', metavar='OWNER/NAME', default=None, help='upload the folder to the Hub')
    convert.add_argument('--private', action='store_true', help='create the Hub repository as private')
    convert.set_defaults(func=_cmd_convert)

    predict = sub.add_parser('predict', help="top-k classes of images (ImageNet's, or the checkpoint's own names)")
    _add_model_arguments(predict)
    predict.add_argument('--topk', type=int, default=5, help='how many classes to print (default 5)')
    predict.add_argument('images', nargs='+', help='image files')
    predict.set_defaults(func=_cmd_predict)

    visualize = sub.add_parser('visualize', help='attention maps of a focused linear attention layer, as a PNG')
    _add_model_arguments(visualize)
    visualize.add_argument('--image', required=True, help='image file')
    visualize.add_argument('--stage', type=int, default=None, help='stage of the layer (default: the first '
                           'with focused linear attention)')
    visualize.add_argument('--block', type=int, default=None, help='block in that stage (default 0)')
    visualize.add_argument('--head', type=int, default=0, help='attention head (default 0)')
    visualize.add_argument('--points', type=_point, nargs='+', default=None, metavar='X,Y',
                           help='query points, pixels of the model input (default: the centre)')
    visualize.add_argument('--output', required=True, help='PNG to write')
    visualize.set_defaults(func=_cmd_visualize)

    bench = sub.add_parser('bench', help='images/s and memory of flatten models beside timm softmax peers')
    bench.add_argument('--models', nargs='+', default=['flatten_pvt_v2_b0', 'flatten_swin_tiny_patch4_224'],
                       help='flatten models to measure')
    bench.add_argument('--img-size', type=_image_size, nargs='+', default=[(224, 224)],
                       help='resolutions: 224, or HEIGHTxWIDTH such as 800x1344 (default 224)')
    bench.add_argument('--features-only', action='store_true',
                       help='measure the features_only backbones (stage maps), as detectors use them')
    bench.add_argument('-b', '--batch-size', type=int, default=32, help='images per batch (default 32)')
    bench.add_argument('--dtype', default='fp32', choices=['fp32', 'bf16', 'fp16'], help='fp32, or autocast')
    bench.add_argument('--mode', nargs='+', default=['infer'], choices=['infer', 'train', 'compile'],
                       help='inference, a training step, compiled inference')
    bench.add_argument('--device', default=None,
                       help="device to measure on, e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu)")
    bench.add_argument('--no-peers', action='store_true', help="skip timm's softmax models")
    bench.add_argument('--no-memory', action='store_true',
                       help='skip the peak memory on a CPU (each model is built again and two steps traced, which '
                            'takes a few seconds each; on CUDA it is free and always measured)')
    bench.add_argument('--official-repo', default=None,
                       help='a checkout of LeapLabTHU/FLatten-Transformer, to measure the official code too')
    bench.add_argument('--warmup', type=int, default=3, help='untimed batches per model first (default 3)')
    bench.add_argument('--repeats', type=int, default=10,
                       help='timed batches per model, taken in turns with the other models; the median is reported '
                            '(default 10)')
    bench.add_argument('--json', default=None, help='write the results and environment as JSON')
    bench.add_argument('--plot', default=None, help='write a PNG of images/s against resolution')
    bench.set_defaults(func=_cmd_bench)

    export = sub.add_parser('export', help='export to ONNX (classifier or features_only backbone), checked in '
                                           'ONNX Runtime')
    _add_model_arguments(export)
    export.add_argument('--features-only', action='store_true', help='export the backbone: one output per stage')
    export.add_argument('--dynamic', action='store_true',
                        help='dynamic batch, height and width (the graph is right at every size)')
    export.add_argument('--img-size', type=int, nargs=2, metavar=('H', 'W'), default=None,
                        help="export size (default: the model's input size)")
    export.add_argument('--exporter', default='torchscript', choices=['torchscript', 'dynamo'],
                        help="torch.onnx's TorchScript-based exporter (default) or dynamo=True (torch.export)")
    export.add_argument('--opset', type=int, default=None, help="ONNX opset (default: the exporter's)")
    export.add_argument('--output', required=True, help='.onnx file to write')
    export.set_defaults(func=_cmd_export)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format='%(levelname)s %(message)s')
    import flatten_timm  # noqa: F401  registers the models
    from .attention_maps import LayerChoiceError
    from .checkpoint import CheckpointError
    from .export import ExportError
    from ._optional import MissingExtraError
    from .hub import PretrainedWeightsUnavailable
    try:
        return args.func(args)
    except (CheckpointError, ExportError, FileNotFoundError, LayerChoiceError) as e:
        print(f'flatten-timm {args.command}: error: {e}', file=sys.stderr)
        return 2
    except (PretrainedWeightsUnavailable, MissingExtraError) as e:
        print(f'flatten-timm {args.command}: error: {e}', file=sys.stderr)
        return 2
    except urllib.error.URLError as e:
        print(f'flatten-timm {args.command}: error: could not download the weights ({e.reason}); without a '
              f'network, download them elsewhere and pass --checkpoint FILE', file=sys.stderr)
        return 2
    except RuntimeError as e:
        if not str(e).startswith('Unknown model'):
            raise
        print(f'flatten-timm {args.command}: error: {e}; `flatten-timm models` lists the names', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
