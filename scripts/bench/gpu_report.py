""" Merge `flatten-timm bench --json` files into one Markdown table of ratios: FLatten against its timm
softmax peer and the official code, per size, dtype and mode (higher is better for FLatten).

    python scripts/bench/gpu_report.py OUT.md run1.json run2.json ...
"""
import json
import sys


def main(output, *paths):
    rows, env = [], None
    for path in paths:
        try:
            with open(path) as f:
                report = json.load(f)
        except (OSError, ValueError) as e:
            print(f'skipping {path}: {e}')
            continue
        env = env or report['environment']
        rows.extend(report['results'])
    lines = [f"{env['device']}, torch {env['torch']}, timm {env['timm']}, {env['date']}" if env else 'no results', '',
             '| flatten model | size | batch | dtype | mode | img/s | peer | peer img/s | vs peer | official img/s | '
             'vs official | peak MiB (flatten / peer) |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        if r['kind'] != 'flatten':
            continue
        same = [o for o in rows if o['flatten_model'] == r['model'] and o['img_size'] == r['img_size']
                and o['dtype'] == r['dtype'] and o['mode'] == r['mode'] and o['batch_size'] == r['batch_size']
                and o.get('features_only') == r.get('features_only')]
        peer = next((o for o in same if o['kind'] == 'softmax peer'), None)
        official = next((o for o in same if o['kind'] == 'official'), None)
        mode = r['mode'] + (' (features)' if r.get('features_only') else '')
        cells = [r['model'], r['img_size'], r['batch_size'], r['dtype'], mode, f"{r['img_per_s']:.0f}"]
        cells += [peer['model'], f"{peer['img_per_s']:.0f}", f"{r['img_per_s'] / peer['img_per_s']:.2f}x"] \
            if peer else ['', '', '']
        cells += [f"{official['img_per_s']:.0f}", f"{r['img_per_s'] / official['img_per_s']:.2f}x"] \
            if official else ['', '']
        cells.append(f"{r['peak_mib']:.0f} / {peer['peak_mib']:.0f}" if peer and r['peak_mib'] and peer['peak_mib']
                     else '')
        lines.append('| ' + ' | '.join(str(c) for c in cells) + ' |')
    text = '\n'.join(lines) + '\n'
    with open(output, 'w') as f:
        f.write(text)
    print(text)


if __name__ == '__main__':
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
