""" Params and GFLOPs (Ultralytics' own model_info, 640x640) of configs/yolo beside the unmodified models.

    python scripts/yolo_info.py [--scales n s]     # prints the README's Markdown table
"""
import argparse
import logging
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / 'configs' / 'yolo'
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
    LOGGER.setLevel(logging.WARNING)
    rows = []
    for ours, base in PAIRS:
        for scale in args.scales:
            mine, theirs = info(YOLO(str(CONFIGS / (ours.format(scale) + '.yaml')))), info(YOLO(base.format(scale)))
            rows.append((ours.format(scale), base.format(scale)[:-5], mine, theirs))
    rows.append(('rtdetr-l-fla', 'rtdetr-l', info(RTDETR(str(CONFIGS / 'rtdetr-l-fla.yaml'))),
                 info(RTDETR('rtdetr-l.yaml'))))
    print('| model | params (M) | GFLOPs | unmodified | params (M) | GFLOPs |')
    print('|---|---|---|---|---|---|')
    for name, base, (p, g), (bp, bg) in rows:
        print(f'| {name} | {p:.2f} | {g:.1f} | {base} | {bp:.2f} | {bg:.1f} |')


if __name__ == '__main__':
    main()
