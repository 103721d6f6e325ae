"""The main job on the embedded default model: a few chat prompts generated through paged KV memory.

    python -m hf_paged.demo [--max-new-tokens N] [--dtype float32|bfloat16]

Runs the prompts as one continuous batch through ``LLMEngine`` and prints each answer, then the KV
blocks the batch used at its peak and the engine's metrics; finally the same model, wrapped with
``hf_paged.wrap``, answers through HF's ``generate`` signature.
"""

from __future__ import annotations

import argparse
import time

import torch

import hf_paged
from hf_paged.models import load_default_model

PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a haiku about paged memory.",
    "Give three tips for writing clear code.",
    "Explain in two sentences why the sky is blue.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()

    print("loading SmolLM2-135M-Instruct (embedded default model) ...", flush=True)
    model, tok = load_default_model(dtype=getattr(torch, args.dtype))
    chats = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in PROMPTS]
    engine = hf_paged.LLMEngine(model, tok, memory_bytes=256 << 20)
    start = time.perf_counter()
    outs = engine.generate(chats, hf_paged.SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0),
                           use_tqdm=False)
    elapsed = time.perf_counter() - start
    for prompt, out in zip(PROMPTS, outs):
        print(f"\n>>> {prompt}\n{out.text.strip()}\n[{len(out.token_ids)} tokens, finish: {out.finish_reason.value}]")
    m = engine.metrics.summary()
    pool = engine.pool
    print(f"\nKV blocks: peak {m['peak_blocks_in_use']} of {pool.num_blocks} "
          f"({pool.block_size} tokens each, {engine.kv_cache.bytes_per_block / 1024:.0f} KiB each), "
          f"slot utilisation at peak {m['kv_slot_utilization_at_peak']:.1%}, "
          f"in use now {pool.num_used_blocks}, prefix-cache hit rate {m['prefix_cache_hit_rate']:.0%}")
    print(f"{m['output_tokens']} tokens in {elapsed:.1f} s = {m['output_tokens'] / elapsed:.1f} tok/s, "
          f"mean TTFT {m['mean_ttft_s'] * 1000:.0f} ms, mean TPOT {m['mean_tpot_s'] * 1000:.0f} ms")

    hf_paged.wrap(model, tok, memory_bytes=64 << 20)
    tok.padding_side = "left"
    inputs = tok(chats[:2], return_tensors="pt", padding=True)
    seqs = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    print("\nwrapped model.generate:", seqs.shape)
    for row in seqs:
        print(" ", tok.decode(row[inputs.input_ids.shape[1]:], skip_special_tokens=True).strip())


if __name__ == "__main__":
    main()
