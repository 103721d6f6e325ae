"""Sweep the Triton decode kernel's launch settings on a CUDA device: tile (keys per step), warps, pipeline stages,
and fp16/bf16 operands fed to ``tl.dot`` as they are (``NATIVE_DOT``) or widened to fp32 first.

    python benchmarks/triton_decode_sweep.py OUT_DIR [--budget SECONDS]

For three decode shapes (batch x context, GQA 32/8 heads, block 16, bf16) it prints each setting's time and K/V
GB/s, the five best per shape, and writes ``OUT_DIR/sweep.json``. The module constants ``DECODE_TILE_N``,
``DECODE_NUM_WARPS``, ``DECODE_NUM_STAGES`` and ``DECODE_NATIVE_DOT`` of ``hf_paged.execution.kernels.triton_paged_attention``
hold the chosen setting; docs/benchmarks.md has the sweep behind it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = ((64, 4096, 128), (16, 2048, 128), (64, 768, 64))  # (batch, context, head_dim)
KV_HEADS, HEADS, BLOCK_SIZE = 8, 32, 16


def main() -> None:
    import triton.testing

    from hf_paged.execution.kernels import triton_paged_attention as tpa

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--budget", type=float, default=150.0, help="seconds; settings left when it is spent are skipped")
    args = p.parse_args()
    device = torch.device("cuda")
    started, results = time.monotonic(), []
    for batch, context, head_dim in SHAPES:
        blocks_per_seq = -(-context // BLOCK_SIZE)
        num_blocks = batch * blocks_per_seq
        key_cache, value_cache = (torch.randn(num_blocks + 1, BLOCK_SIZE, KV_HEADS, head_dim, device=device,
                                              dtype=torch.bfloat16) for _ in range(2))
        tables = torch.randperm(num_blocks, device=device).view(batch, blocks_per_seq)
        lens = torch.full((batch,), context, dtype=torch.int32, device=device)
        query = torch.randn(batch, HEADS, head_dim, device=device, dtype=torch.bfloat16)
        out = torch.empty_like(query)
        kv_bytes = 2 * key_cache[:-1].numel() * key_cache.element_size()
        reference = None
        for tile, warps, stages, native in itertools.product((32, 64, 128), (4, 8), (2, 3, 4), (False, True)):
            if time.monotonic() - started > args.budget:
                break
            tpa.DECODE_NATIVE_DOT, tpa.DECODE_NUM_WARPS, tpa.DECODE_NUM_STAGES = native, warps, stages

            def decode() -> None:
                tpa.paged_decode_attention(out, query, key_cache, value_cache, tables, lens, batch, context,
                                           head_dim ** -0.5, tile_n=tile)

            decode()
            torch.cuda.synchronize()
            reference = out.clone() if reference is None else reference
            ms = triton.testing.do_bench(decode, warmup=10, rep=40)
            row = dict(batch=batch, context=context, head_dim=head_dim, native_dot=native, tile=tile, warps=warps,
                       stages=stages, us=ms * 1e3, gbps=kv_bytes / ms / 1e6,
                       max_abs_diff=float((out.float() - reference.float()).abs().max()))
            results.append(row)
            print(row, flush=True)
        best = sorted((r for r in results if (r["batch"], r["context"]) == (batch, context)), key=lambda r: r["us"])
        print(f"best at batch {batch} x context {context}:", *best[:5], sep="\n  ", flush=True)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(args.out_dir) / "sweep.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
