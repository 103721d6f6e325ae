"""Sliding-window KV memory: a Mistral-style model (every layer windowed) generating several windows per sequence,
the engine's peak KV blocks against what full-length K/V would hold, in one run.

    benchmarks/sliding_window.py [--window 256] [--seqs 8] [--prompt 128] [--windows 4] [--block-size 16]

A random Mistral of Mistral-7B's layer shape scaled down (hidden 512, 4 layers, 8 query / 2 KV heads), fp32, greedy,
EOS ignored. Prints the peak blocks in use (and bytes), the blocks full-length K/V needs for the same sequences, the
ratio, and output tok/s.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--windows", type=int, default=4, help="new tokens per sequence, in windows")
    ap.add_argument("--block-size", type=int, default=16)
    args = ap.parse_args()

    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from hf_paged import LLMEngine, SamplingParams

    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=2, sliding_window=args.window,
                           max_position_embeddings=8192)
    model = MistralForCausalLM(config).eval()
    new = args.windows * args.window
    prompts = [torch.randint(10, 32000, (args.prompt,)).tolist() for _ in range(args.seqs)]
    full_blocks = args.seqs * -(-(args.prompt + new) // args.block_size)
    with torch.inference_mode(), LLMEngine(model, None, num_blocks=full_blocks + 16, block_size=args.block_size,
                                           enable_prefix_caching=False) as engine:
        start = time.perf_counter()
        engine.generate(prompts, SamplingParams(max_new_tokens=new, temperature=0, ignore_eos=True), use_tqdm=False)
        seconds = time.perf_counter() - start
        block_bytes = engine.kv_cache.bytes_per_block
        peak = engine.metrics.peak_blocks_in_use
    print(f"\n{args.seqs} sequences x ({args.prompt} prompt + {new} new) tokens, window {args.window}, "
          f"block size {args.block_size}")
    print("| KV | peak blocks | peak MiB |\n|---|---:|---:|")
    print(f"| full length (what every token kept would need) | {full_blocks} | {full_blocks * block_bytes / 2**20:.1f} |")
    print(f"| hf_paged, blocks behind the window freed | {peak} | {peak * block_bytes / 2**20:.1f} |")
    print(f"saving: {full_blocks / peak:.2f}x less KV memory; {args.seqs * new / seconds:.1f} output tok/s")


if __name__ == "__main__":
    main()
