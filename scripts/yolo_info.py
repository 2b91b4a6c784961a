""" Params and GFLOPs (Ultralytics' own model_info, 640x640) of flatten_timm's model YAMLs beside the unmodified
models.

    python scripts/yolo_info.py [--scales n s]     # prints the README's Markdown table

The YAMLs are the packaged ones (flatten_timm/configs/yolo), named as users name them after register().
"""
import argparse
import logging
import sys

PAIRS = [  # (our YAML stem, Ultralytics' unmodified model)
    ('yolov8{}-fla-p5', 'yolov8{}.yaml'),
    ('yolov8{}-c2f-fla', 'yolov8{}.yaml'),
    ('yolo11{}-fla-p5', 'yolo11{}.yaml'),
    ('yolo11{}-c2f-fla', 'yolo11{}.yaml'),
]


def info(model) -> tuple:
    from ultralytics.utils.torch_utils import model_info
    _, params, _, gflops = model_info(model.model, verbose=True, imgsz=640)  # returns nothing unless verbose
    return params / 1e6, gflops


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--scales', nargs='+', default=['n', 's'])
    args = parser.parse_args()
    from flatten_timm.integrations.ultralytics import register
    register()
    from ultralytics import RTDETR, YOLO
    from ultralytics.utils import LOGGER
    LOGGER.setLevel(logging.ERROR)  # its warning that RT-DETR's YAML names no scale ('l' is meant)
    pairs = [(YOLO, ours.format(scale), base.format(scale)) for ours, base in PAIRS for scale in args.scales]
    pairs.append((RTDETR, 'rtdetr-l-fla', 'rtdetr-l.yaml'))
    rows = []
    for i, (model_cls, ours, base) in enumerate(pairs):
        print(f'[{i + 1}/{len(pairs)}] {ours} and {base[:-5]}', file=sys.stderr, flush=True)
        rows.append((ours, base[:-5], info(model_cls(f'{ours}.yaml')), info(model_cls(base))))
    print('| model | params (M) | GFLOPs | unmodified | params (M) | GFLOPs |')
    print('|---|---|---|---|---|---|')
    for name, base, (p, g), (bp, bg) in rows:
        print(f'| {name} | {p:.2f} | {g:.1f} | {base} | {bp:.2f} | {bg:.1f} |')


if __name__ == '__main__':
    main()
