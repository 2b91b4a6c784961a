""" The focused linear attention core alone: torch ops against the fused Triton kernels, and the HBM floor.

The floor is reading q, k, v and writing the output once at the copy bandwidth measured in the same run
(a large device-to-device copy). Shapes (batch, tokens, channels, heads) are those of the released
models' first stages (docs/performance.md). Needs a CUDA GPU.

    python scripts/bench/bench_attention_core.py [--json core.json]
"""
import argparse
import json

import torch
import triton.testing

from flatten_timm.layers.focused_linear_attention import focused_linear_attention
from flatten_timm.layers.fla.triton_kernels import triton_focused_linear_attention

SHAPES = [((128, 3136, 64, 1), torch.bfloat16), ((128, 3136, 64, 1), torch.float32),
          ((128, 784, 128, 2), torch.bfloat16), ((32, 12544, 96, 3), torch.bfloat16)]


def copy_bandwidth() -> float:
    """Bytes per second of a 2 GiB device-to-device copy, counting bytes read and written."""
    src = torch.empty(2 ** 29, device='cuda')
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode='median')
    return 2 * src.numel() * 4 / (ms * 1e-3)


def profile():
    (B, N, C, H), dtype = SHAPES[0]
    leaves = [torch.randn(B, N, C, device='cuda').to(dtype).requires_grad_() for _ in range(4)]
    floor = torch.full((C,), 1e-6, device='cuda')
    grad = torch.randn(B, N, C, device='cuda').to(dtype)
    for name, fn in (('torch', focused_linear_attention), ('triton', triton_focused_linear_attention)):
        for _ in range(3):
            fn(leaves[0], leaves[1], leaves[2], floor, 3, H, leaves[3]).backward(grad)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn(leaves[0], leaves[1], leaves[2], floor, 3, H, leaves[3]).backward(grad)
            torch.cuda.synchronize()
        print(f'{name}, {B}x{N}x{C}, {H} heads, {dtype}, 5 x (forward + backward)')
        print(prof.key_averages().table(sort_by='cuda_time_total', row_limit=14, max_name_column_width=60))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--json', default=None)
    parser.add_argument('--profile', action='store_true',
                        help='instead, list the CUDA kernels of forward + backward of the first shape, '
                             'per implementation')
    args = parser.parse_args()
    if args.profile:
        return profile()
    bandwidth = copy_bandwidth()
    rows = []
    for (B, N, C, H), dtype in SHAPES:
        g = torch.Generator(device='cuda').manual_seed(0)
        q, k, v, res = (torch.randn(B, N, C, device='cuda', generator=g).to(dtype) for _ in range(4))
        floor = torch.full((C,), 1e-6, device='cuda')
        impls = {'torch': focused_linear_attention, 'triton': triton_focused_linear_attention}
        row = {'shape': f'{B}, {N}, {C}, {H}', 'dtype': str(dtype).replace('torch.', '')}
        with torch.no_grad():
            reference = focused_linear_attention(q.float(), k.float(), v.float(), floor, 3, H, res.float())
            out = triton_focused_linear_attention(q, k, v, floor, 3, H, res)
            row['triton_rel_err'] = ((out.float() - reference).norm() / reference.norm()).item()
            for name, fn in impls.items():
                row[f'{name}_fwd_ms'] = triton.testing.do_bench(
                    lambda: fn(q, k, v, floor, 3, H, res), return_mode='median')
        leaves = [t.detach().requires_grad_() for t in (q, k, v, res)]
        grad = torch.randn_like(q)
        for name, fn in impls.items():
            def step():
                fn(leaves[0], leaves[1], leaves[2], floor, 3, H, leaves[3]).backward(grad)
            row[f'{name}_fwd_bwd_ms'] = triton.testing.do_bench(step, return_mode='median', grad_to_none=leaves)
        # q, k, v and the residual read once, the output written once
        row['hbm_floor_ms'] = 5 * q.numel() * q.element_size() / bandwidth * 1e3
        rows.append(row)
        print(row, flush=True)

    print(f'\ncopy bandwidth {bandwidth / 1e12:.2f} TB/s, {torch.cuda.get_device_name()}\n')
    print('| shape (B, N, C, heads) | dtype | torch fwd ms | triton fwd ms | speed-up | HBM floor ms | '
          'triton / floor | torch fwd+bwd ms | triton fwd+bwd ms | speed-up | triton rel. error |')
    print('|---|---|---|---|---|---|---|---|---|---|---|')
    for r in rows:
        print(f"| {r['shape']} | {r['dtype']} | {r['torch_fwd_ms']:.3f} | {r['triton_fwd_ms']:.3f} | "
              f"{r['torch_fwd_ms'] / r['triton_fwd_ms']:.2f}x | {r['hbm_floor_ms']:.3f} | "
              f"{r['triton_fwd_ms'] / r['hbm_floor_ms']:.2f} | {r['torch_fwd_bwd_ms']:.3f} | "
              f"{r['triton_fwd_bwd_ms']:.3f} | {r['torch_fwd_bwd_ms'] / r['triton_fwd_bwd_ms']:.2f}x | "
              f"{r['triton_rel_err']:.1e} |")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'device': torch.cuda.get_device_name(), 'copy_tb_per_s': bandwidth / 1e12, 'rows': rows}, f,
                      indent=1)


if __name__ == '__main__':
    main()
