"""A hybrid model (gated-DeltaNet linear attention + full attention, Qwen3-Next's layout) under continuous batching:
hf_paged's engine against plain HF ``generate`` on the same requests, memory and throughput, in one run.

    benchmarks/hybrid.py [--requests 16] [--min-prompt 32] [--max-prompt 256] [--new 64] [--block-size 16]

A random Qwen3-Next of reduced size (hidden 512, 8 layers: three linear-attention layers to one full-attention layer,
dense MLPs), fp32, greedy, EOS ignored, prompts of random lengths. HF runs them as one left-padded batch
(``DynamicCache``: K/V of every attention layer for the padded length, conv and recurrent states per row); hf_paged
runs them as requests (K/V in blocks for the attention layers only, one state slot per running sequence). Prints each
side's cache memory at its peak, output tok/s, the ratios, and how many requests got the same tokens.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            total += t.numel() * t.element_size() if t is not None and hasattr(t, "numel") else 0
        for name in ("conv_states", "recurrent_states"):
            for t in (getattr(layer, name, None) or {}).values():
                total += t.numel() * t.element_size() if t is not None else 0
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--min-prompt", type=int, default=32)
    ap.add_argument("--max-prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    args = ap.parse_args()

    import torch
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    from hf_paged import LLMEngine, SamplingParams

    torch.manual_seed(0)
    layers = 8
    config = Qwen3NextConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=layers,
                             num_attention_heads=8, num_key_value_heads=2, head_dim=64, linear_num_key_heads=4,
                             linear_num_value_heads=8, linear_key_head_dim=64, linear_value_head_dim=64,
                             layer_types=["full_attention" if (i + 1) % 4 == 0 else "linear_attention"
                                          for i in range(layers)],
                             mlp_only_layers=list(range(layers)), max_position_embeddings=8192, pad_token_id=0)
    model = Qwen3NextForCausalLM(config).eval()
    lengths = torch.randint(args.min_prompt, args.max_prompt + 1, (args.requests,)).tolist()
    prompts = [torch.randint(10, 32000, (n,)).tolist() for n in lengths]
    width = max(lengths)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = (ids != 0).long()
    for row, n in zip(mask, lengths):
        row[width - n:] = 1

    with torch.inference_mode():
        model.generate(input_ids=ids[:1, -8:], attention_mask=mask[:1, -8:], max_new_tokens=2, do_sample=False)
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new, do_sample=False,
                             eos_token_id=None, return_dict_in_generate=True)
        hf_seconds = time.perf_counter() - start
    hf_bytes = _cache_bytes(out.past_key_values)
    hf_tokens = out.sequences[:, width:].tolist()

    num_blocks = sum(-(-(n + args.new) // args.block_size) for n in lengths) + 8
    with LLMEngine(model, None, num_blocks=num_blocks, block_size=args.block_size) as engine:
        start = time.perf_counter()
        outs = engine.generate(prompts, SamplingParams(max_new_tokens=args.new, temperature=0, ignore_eos=True),
                               use_tqdm=False)
        paged_seconds = time.perf_counter() - start
        state_bytes = engine.runner.recurrent.nbytes  # allocated: one row per slot, grown as slots are taken
        kv_bytes = engine.metrics.peak_blocks_in_use * engine.kv_cache.bytes_per_block
    same = sum(o.token_ids == t for o, t in zip(outs, hf_tokens))
    generated = args.requests * args.new
    print(f"\n{args.requests} requests, prompts {args.min_prompt}-{args.max_prompt} tokens (HF pads to {width}), "
          f"{args.new} new each; {layers} layers ({layers // 4} full attention), fp32")
    print("| | cache MiB at peak | output tok/s |\n|---|---:|---:|")
    print(f"| HF generate (padded batch, DynamicCache) | {hf_bytes / 2**20:.1f} | {generated / hf_seconds:.1f} |")
    print(f"| hf_paged (K/V blocks {kv_bytes / 2**20:.1f} + states {state_bytes / 2**20:.1f}) | "
          f"{(kv_bytes + state_bytes) / 2**20:.1f} | {generated / paged_seconds:.1f} |")
    print(f"ratios: {hf_bytes / (kv_bytes + state_bytes):.2f}x less cache memory, "
          f"{hf_seconds / paged_seconds:.2f}x throughput; same tokens as HF in {same}/{args.requests} requests")


if __name__ == "__main__":
    main()
