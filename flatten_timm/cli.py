""" The `flatten-timm` command line."""
import argparse
import json
import logging
import sys
from typing import List, Optional

__all__ = ['main']


def _cmd_models(args) -> int:
    from .zoo import describe_model, list_flatten_models
    names = [n for n in list_flatten_models() if not args.filter or args.filter in n]
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='flatten-timm', description='FLatten Transformer backbones for timm.')
    parser.add_argument('-v', '--verbose', action='store_true', help='log what happens')
    sub = parser.add_subparsers(dest='command', required=True)
    models = sub.add_parser('models', help='list the model zoo: params, GMACs, released top-1')
    models.add_argument('--filter', default='', help='only names containing this text')
    models.add_argument('--json', action='store_true', help='print JSON instead of a table')
    models.set_defaults(func=_cmd_models)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format='%(levelname)s %(message)s')
    import flatten_timm  # noqa: F401  registers the models
    return args.func(args)


if __name__ == '__main__':
    sys.exit(main())
