"""The int8 KV cache against K/V kept in the model's dtype, on SmolLM2: accuracy and decode speed, one markdown table.

    benchmarks/kv_cache_dtype.py [--dtype float32,bfloat16] [-n 32] [--max-new 128] [--threads 2]

For each model dtype the mixed workload (``workloads.peer_workload("mixed")``: prompts of 20-1000 tokens; here the
first ``-n`` of them, outputs capped at ``--max-new`` tokens) runs greedily on two engines that differ only in
``kv_cache_dtype`` (``"auto"``, the reference, then ``"int8"``); prefix caching is off and every request produces
exactly its output length. Reported:

* tokens equal: the fraction of output positions whose token is the reference's (position by position; after a
  divergence the contexts differ, so this counts chance agreement too), and the mean position of each request's
  first divergence (its output length when there is none);
* mean |Δ logprob|: the chosen token's log-probability against the reference's, over the positions before each
  request's first divergence (same context, same token: only the K/V rounding differs);
* perplexity of ``benchmarks/data/pride_and_prejudice_ch1.txt`` (public domain), teacher-forced through a
  ``PagedCache`` of that kv_cache_dtype in chunks of ``--ppl-chunk`` tokens: every chunk's K/V are written to the
  pool first and all attention reads them back from it (int8: quantized), as the engine's attention does;
* decode-only step time: the mean time of the runner's forward over steps without prefill (as
  ``step_breakdown.py`` counts them), and the int8 engine's speed-up over the reference's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

TEXT = HERE / "data" / "pride_and_prejudice_ch1.txt"


def run_engine(model, tok, wl, kv_cache_dtype: str, memory_bytes: int) -> dict:
    """Greedy run of ``wl`` with chosen-token logprobs; decode-only step times of the timed run."""
    from hf_paged import LLMEngine, SamplingParams

    def params(m: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=m, min_new_tokens=m, temperature=0.0, logprobs=True)

    engine = LLMEngine(model, tok, enable_prefix_caching=False, memory_bytes=memory_bytes,
                       kv_cache_dtype=kv_cache_dtype)
    engine.generate(wl.warmup_prompts, params(4), use_tqdm=False)
    decode_steps: list[float] = []
    execute = engine.runner.execute

    def timed_execute(step):
        t = time.perf_counter()
        out = execute(step)
        if all(len(s.token_ids) == 1 and s.first_position > 0 for s in step.seqs):  # decode only
            decode_steps.append(time.perf_counter() - t)
        return out

    engine.runner.execute = timed_execute
    start = time.perf_counter()
    outs = engine.generate(wl.prompts, [params(m) for m in wl.out_lens], use_tqdm=False)
    elapsed = time.perf_counter() - start
    pool = engine.pool
    result = {"plan": str(engine.plan), "blocks": pool.num_blocks,
              "bytes_per_block": engine.kv_cache.bytes_per_block,
              "block_size": pool.block_size, "elapsed_s": elapsed, "decode_steps": decode_steps,
              "tokens": [o.token_ids for o in outs], "logprobs": [o.logprobs for o in outs]}
    engine.close()
    return result


def perplexity(model, tok, kv_cache_dtype: str, chunk: int) -> float:
    """exp(mean NLL) of the text, teacher-forced chunk by chunk through a PagedCache."""
    import torch

    from hf_paged import PagedCache

    ids = tok(TEXT.read_text(), return_tensors="pt").input_ids
    nll, count = 0.0, 0
    with torch.inference_mode(), PagedCache(model, kv_cache_dtype=kv_cache_dtype) as cache:
        for start in range(0, ids.shape[1] - 1, chunk):
            piece = ids[:, start : start + chunk]
            logits = model(piece, past_key_values=cache, use_cache=True).logits[0].float()
            targets = ids[0, start + 1 : start + 1 + piece.shape[1]]
            logp = torch.log_softmax(logits[: targets.shape[0]], -1)
            nll -= logp.gather(1, targets[:, None]).sum().item()
            count += targets.shape[0]
    return float(torch.exp(torch.tensor(nll / count)))


def compare(ref: dict, run: dict) -> dict:
    equal = total = 0
    first, dlp = [], []
    for a, b, la, lb in zip(ref["tokens"], run["tokens"], ref["logprobs"], run["logprobs"]):
        total += len(a)
        equal += sum(x == y for x, y in zip(a, b))
        d = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        first.append(d)
        dlp.extend(abs(x - y) for x, y in zip(la[:d], lb[:d]))
    return {"equal": equal / total, "first_divergence": statistics.fmean(first),
            "dlogprob": statistics.fmean(dlp) if dlp else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32,bfloat16", help="comma-separated model dtypes")
    ap.add_argument("-n", "--num-prompts", type=int, default=32)
    ap.add_argument("--max-new", type=int, default=128, help="cap on each request's output length")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory", type=float, default=2.0, help="KV pool GiB (both engines; enough for no preemption)")
    ap.add_argument("--ppl-chunk", type=int, default=32)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from hf_paged.models import default_model_dir, load_default_model
    from workloads import peer_workload

    wl = peer_workload("mixed", AutoTokenizer.from_pretrained(default_model_dir()), args.num_prompts)
    wl.out_lens = [min(m, args.max_new) for m in wl.out_lens]
    print(f"mixed workload: {wl.n} prompts of {min(wl.prompt_lens)}-{max(wl.prompt_lens)} tokens (mean "
          f"{statistics.fmean(wl.prompt_lens):.0f}), {sum(wl.out_lens)} output tokens (each capped at "
          f"{args.max_new}), mean decode context {wl.mean_decode_context:.0f}; {args.threads} threads")
    rows = []
    for dtype in args.dtype.split(","):
        model, tok = load_default_model(getattr(torch, dtype))
        runs = {kv: run_engine(model, tok, wl, kv, int(args.memory * 2**30)) for kv in ("auto", "int8")}
        ppl = {kv: perplexity(model, tok, kv, args.ppl_chunk) for kv in ("auto", "int8")}
        ref_step = statistics.fmean(runs["auto"]["decode_steps"])
        for kv, run in runs.items():
            acc = compare(runs["auto"], run)
            step = statistics.fmean(run["decode_steps"])
            print(f"  {dtype} {kv}: {run['plan']}; {len(run['decode_steps'])} decode-only steps, "
                  f"run {run['elapsed_s']:.1f} s")
            rows.append((dtype, kv, run["bytes_per_block"] / run["block_size"] / 1024, run["blocks"], acc, ppl[kv],
                         step * 1e3, ref_step / step))
    print()
    print("| model dtype | kv_cache_dtype | KV KiB / token | blocks in the pool | tokens equal | mean first "
          "divergence | mean abs Δ logprob | perplexity | decode-only step | decode speed-up |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dtype, kv, kib, blocks, acc, ppl, step_ms, speedup in rows:
        print(f"| {dtype} | {kv} | {kib:.1f} | {blocks} | {acc['equal']:.3f} | {acc['first_divergence']:.1f} / "
              f"{statistics.fmean(wl.out_lens):.1f} | {acc['dlogprob']:.4f} | {ppl:.3f} | {step_ms:.1f} ms | "
              f"{speedup:.2f}× |")


if __name__ == "__main__":
    main()
