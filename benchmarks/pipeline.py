"""A list of chat prompts through transformers' text-generation pipeline: plain HF at several ``batch_size``
values against the same pipeline with ``backend="hf_paged"`` (one call, the whole list in flight).

Both load the same model folder in the same dtype, generate greedily with the same options (so their outputs
must be equal: checked in fp32), and are timed around the pipeline call only (model loading, the engine's KV
allocation and one untimed warm-up call excluded). The ratio reported is hf_paged's time against plain HF's
best batch size.

    python benchmarks/pipeline.py                                  # 32 prompts, 64 new tokens, fp32
    python benchmarks/pipeline.py -n 8 --max-new 16 --batch-sizes 1,4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TOPICS = [
    "the history of the printing press", "how bees communicate", "a lighthouse keeper", "the water cycle",
    "a robot learning to paint", "the rules of chess", "why the sky is blue", "a journey across the desert",
    "how compilers work", "the life of a river otter", "a city on Mars", "baking sourdough bread",
    "the invention of the telephone", "volcanoes and plate tectonics", "a library at night", "how vaccines work",
]
ASKS = ["Write a short paragraph about {}.", "Explain {} to a ten-year-old."]


def prompts(n: int) -> list[list[dict[str, str]]]:
    texts = [ask.format(topic) for ask in ASKS for topic in TOPICS]
    return [[{"role": "user", "content": texts[i % len(texts)]}] for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--num-prompts", type=int, default=32)
    ap.add_argument("--max-new", type=int, default=64, help="max_new_tokens (greedy; eos may end a request earlier)")
    ap.add_argument("--batch-sizes", default="1,8,16,32", help="plain HF pipeline batch_size values")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--kv-memory-mib", type=int, default=512, help="hf_paged's KV pool")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's own)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import pipeline

    import hf_paged
    from hf_paged.models import default_model_dir

    path = args.model or str(default_model_dir())
    dtype = getattr(torch, args.dtype)
    chats = prompts(args.num_prompts)
    gen = dict(max_new_tokens=args.max_new, do_sample=False)
    results: dict[str, float] = {}

    plain = pipeline("text-generation", model=path, dtype=dtype)
    plain(chats[:2], batch_size=2, **gen)  # warm-up
    reference = None
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        start = time.perf_counter()
        out = plain(chats, batch_size=bs, **gen)
        results[f"hf batch_size={bs}"] = time.perf_counter() - start
        reference = reference or out
        print(f"hf pipeline, batch_size={bs:>3}: {results[f'hf batch_size={bs}']:7.2f} s", flush=True)
    del plain

    paged = pipeline("text-generation", model=path, dtype=dtype, backend="hf_paged",
                     engine_options={"memory_bytes": args.kv_memory_mib << 20})
    paged(chats[:2], **gen)  # warm-up
    start = time.perf_counter()
    out = paged(chats, **gen)
    results["hf_paged"] = time.perf_counter() - start
    print(f"hf_paged pipeline (whole list): {results['hf_paged']:7.2f} s", flush=True)
    same = out == reference
    if args.dtype == "float32" and not same:
        raise SystemExit("outputs differ from the plain pipeline's (fp32 greedy must be equal)")
    hf_paged.unwrap(paged.model)

    best = min((v, k) for k, v in results.items() if k.startswith("hf "))
    report = {"num_prompts": args.num_prompts, "max_new_tokens": args.max_new, "dtype": args.dtype,
              "threads": torch.get_num_threads(), "seconds": {k: round(v, 3) for k, v in results.items()},
              "best_hf": best[1], "speedup_vs_best_hf": round(best[0] / results["hf_paged"], 2),
              "outputs_equal": same}
    print(json.dumps(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
