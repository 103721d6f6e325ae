"""Where an engine run's time goes: one workload through ``vs_vllm.run_hf_paged`` (the same engine set-up,
warm-up and timed ``generate`` as the comparison with vLLM), its forward time split into steps that prefill
and decode-only steps, and the paged attention time split by kind (decode, whole prompts, prompt chunks).

    benchmarks/step_breakdown.py [--workload fixed|mixed] [--dtype bfloat16] [-n 32] [--compile]

The attention timer wraps the PyTorch/CPU ``paged_attention`` entry (its own overhead is ~1 us a layer). Decode-only
bf16 steps of fused Llama layers on AMX run each layer as one C call, attention included: the timer does not see
their attention (it shows up as decode step time only).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="fixed", choices=["fixed", "mixed"])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("-n", "--num-prompts", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--max-batched-tokens", type=int, default=2048, help="the step's token budget")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from hf_paged.execution.kernels import dispatch
    from hf_paged.models import default_model_dir
    from vs_vllm import run_hf_paged
    from workloads import peer_workload

    wl = peer_workload(args.workload, AutoTokenizer.from_pretrained(default_model_dir()), args.num_prompts)
    steps: list[tuple[float, bool]] = []  # (seconds, prefills)
    attention: dict[str, float] = defaultdict(float)
    attend = dispatch._torch_attention.paged_attention

    def timed_attention(query, key_cache, value_cache, meta, *rest, **kw):
        t = time.perf_counter()
        out = attend(query, key_cache, value_cache, meta, *rest, **kw)
        prompts = list(zip(meta.q_lens_list[meta.num_decodes:], meta.kv_lens_list[meta.num_decodes:]))
        kind = "decode only" if not prompts else ("with prompt chunks" if any(q < kv for q, kv in prompts)
                                                 else "with whole prompts")
        attention[kind] += time.perf_counter() - t
        return out

    def instrument(engine) -> None:  # after the warm-up: only the timed run is counted
        execute = engine.runner.execute

        def timed_execute(step):
            t = time.perf_counter()
            out = execute(step)
            steps.append((time.perf_counter() - t, any(len(s.token_ids) > 1 or s.first_position == 0
                                                       for s in step.seqs)))
            return out

        engine.runner.execute = timed_execute
        dispatch._torch_attention.paged_attention = timed_attention

    try:
        run = run_hf_paged(args.dtype, wl, args.compile, instrument, max_num_batched_tokens=args.max_batched_tokens)
    finally:
        dispatch._torch_attention.paged_attention = attend
    elapsed = run["elapsed_s"]
    prefill = [s for s, p in steps if p]
    decode = [s for s, p in steps if not p]
    print(f"{args.workload} {args.dtype} compile={args.compile}: {run['output_tok_per_s']:.1f} output tok/s, "
          f"{elapsed:.2f} s (start-up incl. warm-up {run['startup_s']:.1f} s)")
    print(f"  steps with prefill: {len(prefill)}, {sum(prefill):.2f} s")
    per_step = 1e3 * sum(decode) / max(len(decode), 1)
    print(f"  decode-only steps:  {len(decode)}, {sum(decode):.2f} s ({per_step:.1f} ms each)")
    print(f"  outside forwards:   {elapsed - sum(prefill) - sum(decode):.2f} s")
    print("  attention (steps " + ", ".join(f"{k}: {v:.2f} s" for k, v in sorted(attention.items())) + ")")

if __name__ == "__main__":
    main()
