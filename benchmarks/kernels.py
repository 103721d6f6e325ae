"""Paged decode attention (the Triton kernel) against dense ``scaled_dot_product_attention`` over the same
tokens, on a GPU: time per call and achieved memory bandwidth as a fraction of the device's peak.

    python benchmarks/kernels.py                       # batch 1..256 x context 512..32k, Llama-3-8B-like heads
    python benchmarks/kernels.py --batch 1 8 --context 4096 --peak-gbps 3350

Decode attention reads every cached K/V byte once and does little arithmetic, so bandwidth is the measure.
Bytes counted: K and V of every sequence's context, the query and the output (and, for the paged kernel,
its block-table rows). The dense baseline gets K/V as contiguous ``[batch, kv_heads, context, head_dim]``
tensors and folds the query heads of a KV head into the query-length axis (GQA without repeating K/V,
as the PyTorch path of hf_paged does). Block tables are random permutations of the pool (a fragmented
pool). Configurations whose tensors do not fit in free GPU memory are skipped (or run without the dense
baseline when only the paged cache fits).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Peak HBM bandwidth in GB/s by device name (most specific first); --peak-gbps overrides.
PEAK_GBPS = [
    ("GH200", 4000.0),
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # SXM5 80 GB
    ("H800", 3350.0),
    ("B200", 8000.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100-PCIE-80GB", 1935.0),
    ("A100", 1555.0),  # 40 GB
    ("A800", 2039.0),
    ("L40S", 864.0),
    ("L40", 864.0),
    ("L4", 300.0),
    ("A10G", 600.0),
    ("A10", 600.0),
    ("V100", 900.0),
    ("RTX 4090", 1008.0),
    ("RTX 3090", 936.0),
]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def peak_gbps_for(name: str) -> float | None:
    for key, gbps in PEAK_GBPS:
        if key.lower() in name.lower():
            return gbps
    return None


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    p.add_argument("--context", type=int, nargs="+", default=[512, 2048, 8192, 32768])
    p.add_argument("--heads", type=int, default=32, help="query heads (default 32)")
    p.add_argument("--kv-heads", type=int, default=8, help="KV heads (default 8)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--sliding-window", type=int, default=None)
    p.add_argument("--num-splits", type=int, default=None, help="force the decode kernel's split count")
    p.add_argument("--peak-gbps", type=float, default=None,
                   help="device peak memory bandwidth in GB/s (default: from a table by device name)")
    p.add_argument("--mem-fraction", type=float, default=0.85, help="share of free GPU memory to use")
    p.add_argument("--no-check", action="store_true", help="skip comparing the paged output with the dense one")
    return p.parse_args()


def bench_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100)


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU: torch.cuda.is_available() is False "
                 f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}). Nothing to measure.")
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("benchmarks/kernels.py needs triton (pip install triton)")
    from hf_paged.execution.kernels import triton_paged_attention as tpa
    from hf_paged.execution.kernels.paged_attention import PagedAttentionMetadata
    from hf_paged.execution.plan import build_plan

    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    peak = args.peak_gbps or peak_gbps_for(name)
    dtype = DTYPES[args.dtype]
    elt = torch.finfo(dtype).bits // 8
    H, KVH, D, BS = args.heads, args.kv_heads, args.head_dim, args.block_size
    if H % KVH:
        sys.exit(f"--heads {H} is not a multiple of --kv-heads {KVH}")
    group = H // KVH
    scale = D ** -0.5
    print(f"device: {name}; peak {'%.0f GB/s' % peak if peak else 'unknown (give --peak-gbps)'}; "
          f"{args.dtype}, heads {H}/{KVH} (group {group}), head_dim {D}, block_size {BS}"
          + (f", sliding window {args.sliding_window}" if args.sliding_window else ""))
    cols = ("batch", "context", "splits", "paged us", "GB/s", "%peak", "dense us", "GB/s", "%peak", "paged/dense",
            "max|diff|")
    print(("{:>6} {:>7} {:>6} {:>9} {:>7} {:>6} {:>9} {:>7} {:>6} {:>11} {:>9}").format(*cols))

    def pct(gbps: float) -> str:
        return f"{100 * gbps / peak:5.1f}%" if peak else "  n/a"

    torch.manual_seed(0)
    for ctx in args.context:
        for batch in args.batch:
            nblocks = -(-ctx // BS)
            kv_bytes = 2 * batch * nblocks * BS * KVH * D * elt
            free, _ = torch.cuda.mem_get_info(device)
            budget = free * args.mem_fraction
            if kv_bytes * 1.05 > budget:
                print(f"{batch:>6} {ctx:>7}  skipped: needs {kv_bytes / 2**30:.1f} GiB of K/V, "
                      f"{budget / 2**30:.1f} GiB usable")
                continue
            with_dense = 2.6 * kv_bytes <= budget  # pool + dense copy + the gather's temporary

            num_blocks = batch * nblocks
            key_cache = torch.randn(num_blocks, BS, KVH, D, device=device, dtype=dtype)
            value_cache = torch.randn(num_blocks, BS, KVH, D, device=device, dtype=dtype)
            block_tables = torch.randperm(num_blocks, device=device).view(batch, nblocks)
            kv_lens_list = [ctx] * batch
            meta = PagedAttentionMetadata(
                slot_mapping=torch.zeros(batch, dtype=torch.long, device=device),
                block_tables=block_tables,
                kv_lens=torch.tensor(kv_lens_list, dtype=torch.int32, device=device),
                cu_seqlens_q=torch.arange(batch + 1, device=device),
                num_decodes=batch, kv_lens_list=kv_lens_list, q_lens_list=[1] * batch, block_size=BS,
                plan=build_plan(device, dtype, pack_weights=False, triton=True),
            )
            query = torch.randn(batch, H, D, device=device, dtype=dtype)
            splits = args.num_splits or tpa.decode_num_splits(batch, KVH, ctx, args.sliding_window, device)

            def paged():
                return tpa.paged_attention_triton(query, key_cache, value_cache, meta, scale,
                                                  sliding_window=args.sliding_window, num_splits=args.num_splits)

            live = min(ctx, args.sliding_window) if args.sliding_window else ctx
            io_bytes = 2 * batch * H * D * elt
            paged_bytes = 2 * batch * live * KVH * D * elt + io_bytes + block_tables.numel() * 8
            paged_ms = bench_ms(paged)
            paged_gbps = paged_bytes / paged_ms / 1e6

            if with_dense:
                # The same tokens, contiguous: [batch, KVH, ctx, D].
                k = key_cache[block_tables].view(batch, nblocks * BS, KVH, D)[:, :ctx].transpose(1, 2).contiguous()
                v = value_cache[block_tables].view(batch, nblocks * BS, KVH, D)[:, :ctx].transpose(1, 2).contiguous()
            else:
                del key_cache, value_cache
                k = torch.randn(batch, KVH, ctx, D, device=device, dtype=dtype)
                v = torch.randn(batch, KVH, ctx, D, device=device, dtype=dtype)
            if args.sliding_window and args.sliding_window < ctx:
                k, v = k[:, :, -args.sliding_window:], v[:, :, -args.sliding_window:]  # the window's keys only
            q = query.view(batch, KVH, group, D)

            def dense():
                return F.scaled_dot_product_attention(q, k, v, scale=scale)

            dense_bytes = 2 * k.numel() * elt + io_bytes
            dense_ms = bench_ms(dense)
            dense_gbps = dense_bytes / dense_ms / 1e6
            diff = "-"
            if with_dense and not args.no_check:
                diff = f"{(paged().float() - dense().reshape(batch, H, D).float()).abs().max().item():.2e}"
            dense_cell = (f"{dense_ms * 1e3:9.1f}", f"{dense_gbps:7.0f}", pct(dense_gbps),
                          f"{paged_ms / dense_ms:11.2f}", diff)
            print(f"{batch:>6} {ctx:>7} {splits:>6} {paged_ms * 1e3:9.1f} {paged_gbps:7.0f} {pct(paged_gbps):>6} "
                  + " ".join(f"{c:>{w}}" for c, w in zip(dense_cell, (9, 7, 6, 11, 9))))
            del k, v, q, query, meta, block_tables
            key_cache = value_cache = None
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
