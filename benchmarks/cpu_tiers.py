"""hf_paged's CPU kernels on one CPU tier against that tier's limits, and one request at a time against plain HF.

    benchmarks/cpu_tiers.py [--cpu-isa avx2] [--dtype float32,bfloat16] [--threads 2] [--single 3] [--json out.json]

``--cpu-isa TIER`` (``avx2``, ``avx512``, ``avx512_bf16``, ``amx``) runs the measurement in a fresh process that
behaves like a CPU of that tier (``hf_paged.execution.kernels.cpu_isa.emulation_env``: hf_paged's C library built for the tier
and its plan capped at it, torch's own kernels, MKL and oneDNN capped too); without it, this CPU's own tier.

1. **Read bandwidth** (a sum over 1 GiB of fp32, best of five, as ``roofline.py``).
2. **Decode attention**, the C kernel: 32 sequences of 1024 tokens, SmolLM2's heads (9 query heads, 3 KV heads,
   head dim 64), block size 16, the blocks of every sequence scattered over a pool larger than the last-level cache
   (each call reads other blocks than the last). Bytes: K and V of every context token; % of the read bandwidth.
3. **Linears**: SmolLM2's four shapes as the engine multiplies them (q/k/v and gate/up concatenated), through what
   the engine's plan packs them for (``patches/linear.py``: the small-row kernel, AMX tiles or oneDNN) at 1, 32 and
   512 rows (one decode, a decode batch, a prefill), GFLOP/s over the four; the tier's GEMM bound is the best of
   torch's ``F.linear`` and oneDNN's packed fp32 GEMM at 512 rows (in fp32: bf16 without a bf16 GEMM is computed in
   fp32 on these CPUs).
4. **One request at a time**: ``--single`` prompts of the fixed workload (128 tokens), 128 new tokens each, greedy,
   one after the other: plain transformers ``generate`` against hf_paged's engine; output tok/s and the ratio.

Prints a markdown table per part; ``--json`` writes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def _best(fn, repeats: int, inner: int = 1) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t) / inner)
    return best


def decode_attention(dtype, seqs: int = 32, context: int = 1024, block: int = 16) -> dict:
    import torch

    from hf_paged.execution.kernels.cpu_decode_attention import decode_attention_cpu
    from roofline import llc_bytes

    heads, kv_heads, hd = 9, 3, 64
    blocks_per_seq = context // block
    copies = max(2, -(-2 * llc_bytes() // (seqs * context * kv_heads * hd * 2 * dtype.itemsize)))
    num_blocks = copies * seqs * blocks_per_seq
    g = torch.Generator().manual_seed(0)
    kc = torch.randn(num_blocks, block, kv_heads, hd, generator=g).to(dtype)
    vc = torch.randn(num_blocks, block, kv_heads, hd, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g)
    tables = [perm[i * seqs * blocks_per_seq:(i + 1) * seqs * blocks_per_seq].view(seqs, blocks_per_seq)
              for i in range(copies)]
    lens = torch.full((seqs,), context, dtype=torch.int32)
    q = torch.randn(seqs, heads, hd, generator=g).to(dtype)
    out = torch.empty_like(q)
    state = [0]

    def call():
        state[0] = (state[0] + 1) % copies
        decode_attention_cpu(q, kc, vc, tables[state[0]], lens, hd ** -0.5, out=out)

    t = _best(call, 5, copies)
    nbytes = 2 * seqs * context * kv_heads * hd * dtype.itemsize
    return {"dtype": str(dtype)[6:], "seqs": seqs, "context": context, "us": t * 1e6, "gb_s": nbytes / t / 1e9}


SHAPES = [("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536)]


def linears(dtype, plan_linears: str, rows_list=(1, 32, 512)) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from hf_paged.execution.kernels import cpu_isa
    from hf_paged.execution.patches.linear import _matmul, _pack
    from roofline import llc_bytes

    g = torch.Generator().manual_seed(0)
    totals = {rows: {"hf_paged": 0.0, "F.linear": 0.0, "onednn fp32": 0.0} for rows in rows_list}
    for name, n, k in SHAPES:
        copies = min(64, max(2, -(-2 * llc_bytes() // (n * k * dtype.itemsize))))  # cold weights for small rows
        weights = [torch.empty(n, k, dtype=dtype).uniform_(-0.05, 0.05, generator=g) for _ in range(copies)]
        packs = [_pack(w, plan_linears) for w in weights]
        for rows in rows_list:
            x = torch.randn(rows, k, generator=g).to(dtype)
            use = len(weights) if rows < 512 else 1
            state = [0]

            def ours():
                state[0] = (state[0] + 1) % use
                _matmul(packs[state[0]], weights[state[0]], x, None)

            def plain():
                state[0] = (state[0] + 1) % use
                F.linear(x, weights[state[0]])

            total = totals[rows]
            total["hf_paged"] += _best(ours, 3, max(use, 3))
            if rows >= 512:  # the tier's GEMM bound (fp32), measured at prefill size
                x32, w32 = x.float(), weights[0].float()
                total["F.linear"] += _best(lambda: F.linear(x32, w32), 3, 3)
                if cpu_isa.onednn_packs(torch.float32):
                    p32 = torch.ops.mkldnn._reorder_linear_weight(w32, None)
                    total["onednn fp32"] += _best(
                        lambda: torch.ops.mkldnn._linear_pointwise(x32, p32, None, "none", [], ""), 3, 3)
            else:
                total["F.linear"] += _best(plain, 3, use)
        del weights, packs
    out = []
    for rows, total in totals.items():
        flops = sum(2 * rows * n * k for _, n, k in SHAPES)
        row = {"dtype": str(dtype)[6:], "rows": rows, "linears": plan_linears}
        row.update({f"{key} gflop_s": flops / t / 1e9 for key, t in total.items() if t})
        out.append(row)
    return out


def one_at_a_time(dtype, n: int, max_new: int = 128) -> dict:
    import torch
    from transformers import AutoTokenizer

    from hf_paged import LLMEngine, SamplingParams
    from hf_paged.models import default_model_dir, load_default_model
    from workloads import fixed_workload

    model, _ = load_default_model(dtype=dtype)
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    wl = fixed_workload(tok, n, 128, max_new)
    res = {"dtype": str(dtype)[6:], "prompts": n, "max_new": max_new}
    with torch.inference_mode():
        for p in wl.warmup_prompts[:2]:
            model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        start = time.perf_counter()
        for p in wl.prompts:
            model.generate(torch.tensor([p]), max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                           pad_token_id=tok.pad_token_id)
        res["hf tok_s"] = n * max_new / (time.perf_counter() - start)
    params = SamplingParams(max_new_tokens=max_new, min_new_tokens=max_new, temperature=0.0)
    with LLMEngine(model, tok, enable_prefix_caching=False, memory_bytes=1 << 30) as engine:
        res["plan"] = str(engine.plan)
        for p in wl.warmup_prompts[:2]:
            engine.generate([p], SamplingParams(max_new_tokens=8, temperature=0.0), use_tqdm=False)
        start = time.perf_counter()
        for p in wl.prompts:
            engine.generate([p], params, use_tqdm=False)
        res["hf_paged tok_s"] = n * max_new / (time.perf_counter() - start)
    res["ratio"] = res["hf_paged tok_s"] / res["hf tok_s"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-isa", default=None, help="emulate this tier (avx2, avx512, avx512_bf16, amx)")
    ap.add_argument("--dtype", default="float32,bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--single", type=int, default=3, help="prompts run one at a time (0: skip that part)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.cpu_isa and os.environ.get("HF_PAGED_CPU_ISA") != args.cpu_isa:
        from hf_paged.execution.kernels.cpu_isa import emulation_env

        env = {**os.environ, **emulation_env(args.cpu_isa)}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)  # torch must start capped

    import torch

    from hf_paged.execution.kernels import cpu_isa
    from hf_paged.execution.plan import build_plan
    from roofline import measure_bandwidth

    torch.set_num_threads(args.threads)
    dtypes = [getattr(torch, d) for d in args.dtype.split(",")]
    report = {"tier": cpu_isa.describe(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
              "load": os.getloadavg()}
    with torch.inference_mode():
        report["bandwidth"] = measure_bandwidth(1.0)
        bw = report["bandwidth"]["read_gb_s"]
        report["attention"] = [decode_attention(d) for d in dtypes]
        report["plans"] = {str(d)[6:]: str(build_plan("cpu", d)) for d in dtypes}
        report["linears"] = [r for d in dtypes for r in linears(d, build_plan("cpu", d).linears)]
    if args.single:
        report["single"] = [one_at_a_time(d, args.single) for d in dtypes]

    print(f"\ntier: {report['tier']}, torch {report['torch']}, {report['date']}, load {report['load'][0]:.2f}, "
          f"read bandwidth {bw:.1f} GB/s")
    for d, plan in report["plans"].items():
        print(f"plan {d}: {plan}")
    print("\n| dtype | decode attention (32 x 1024 tokens) | GB/s | % of read bandwidth |\n|---|---:|---:|---:|")
    for r in report["attention"]:
        print(f"| {r['dtype']} | {r['us']:.0f} us | {r['gb_s']:.1f} | {100 * r['gb_s'] / bw:.0f}% |")
    print("\n| dtype | rows | linears | hf_paged GFLOP/s | F.linear GFLOP/s | oneDNN fp32 GFLOP/s |\n"
          "|---|---:|---|---:|---:|---:|")
    for r in report["linears"]:
        cells = [f"{r.get(k, 0):.0f}" if k in r else "-" for k in
                 ("hf_paged gflop_s", "F.linear gflop_s", "onednn fp32 gflop_s")]
        print(f"| {r['dtype']} | {r['rows']} | {r['linears']} | " + " | ".join(cells) + " |")
    if args.single:
        print("\n| dtype | HF generate, one at a time (tok/s) | hf_paged (tok/s) | ratio |\n|---|---:|---:|---:|")
        for r in report["single"]:
            print(f"| {r['dtype']} | {r['hf tok_s']:.1f} | {r['hf_paged tok_s']:.1f} | {r['ratio']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
