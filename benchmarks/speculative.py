"""Speculative decoding on the engine against plain decoding and HF's own assisted decoding, side by side in one run.

    python benchmarks/speculative.py [--batches 1,4,32] [--workloads grounded,chat] [--max-new 128] [-k 5]
                                     [--methods plain,ngram,draft,hf-ngram] [--draft-noise 0.02] [--json rows.json]
                                     [--threads N] [--log]

Workloads (SmolLM2-135M-Instruct, fp32, greedy, chat template):

- ``grounded``: input-grounded: repeat / lightly edit a given passage of ``data/pride_and_prejudice_ch1.txt``;
  the outputs copy spans of their input (where prompt lookup finds its drafts);
- ``chat``: open-ended chat prompts (the tests' 32 questions).

Per workload and batch size ``b`` (``b`` requests in flight at once, ``max(b, 4)`` requests), each method's decode
tokens/s (generated tokens / wall time) and its ratio to the engine without speculation:

- ``plain``: the engine without speculation;
- ``ngram``: the engine with prompt lookup (``{"method": "ngram", "num_tokens": k}``, adaptive k);
- ``draft``: the engine with a draft model: SmolLM2 drafting for itself through a copy with Gaussian noise of
  ``--draft-noise`` times each weight's std (as large as the target, so its tokens/s say nothing about a real small
  draft; its acceptance rate is the figure);
- ``hf-ngram``: HF ``generate(prompt_lookup_num_tokens=k)`` one request at a time (batch 1 only), beside HF's plain
  greedy ``generate`` (``hf-plain``).

Every engine method's outputs are checked equal to ``plain``'s, token for token.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
LOADAVG = Path("/proc/loadavg")  # the load average beside each figure (a shared machine)
sys.path.insert(0, str(HERE.parent))

from hf_paged import LLMEngine, SamplingParams  # noqa: E402
from hf_paged.models import load_default_model  # noqa: E402

TASKS = ["Repeat the following text exactly, word for word:\n\n{}",
         "Rewrite the following text, changing every 'Mr.' to 'Mister' and keeping everything else the same:\n\n{}",
         "Copy the following passage, then say who is speaking in it:\n\n{}",
         "Correct any spelling mistakes in the following text and write it out in full:\n\n{}"]
CHAT = ["Write a haiku about the sea.", "Tell me about the history of Rome.", "Explain photosynthesis to a child.",
        "Give me a recipe for pancakes.", "Why is the sky blue?", "How do airplanes fly?",
        "Name the planets of the solar system.", "What does a compiler do?",
        "Summarise the plot of Romeo and Juliet.", "Write a short poem about autumn leaves.",
        "Explain what a neural network is.", "Give three tips for better sleep.", "How do bees make honey?",
        "Tell me a fun fact about octopuses.", "What is the difference between weather and climate?",
        "Why do leaves change colour in autumn?"]


def passages(min_words: int = 60, max_words: int = 140) -> list[str]:
    """Consecutive paragraphs of the chapter joined into passages of about 60-140 words."""
    paragraphs = [p.strip() for p in (HERE / "data" / "pride_and_prejudice_ch1.txt").read_text().split("\n\n")
                  if p.strip()]
    out, current = [], []
    for p in paragraphs:
        current.append(p)
        words = sum(len(c.split()) for c in current)
        if words >= min_words:
            if words <= max_words:
                out.append("\n\n".join(current))
            current = []
    return out


def prompts(tok, workload: str, n: int) -> list[list[int]]:
    if workload == "grounded":
        texts = [TASKS[i % len(TASKS)].format(p) for i, p in enumerate(passages())]
    else:
        texts = CHAT
    texts = (texts * (n // len(texts) + 1))[:n]
    out = []
    for t in texts:
        ids = tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def run_engine(model, tok, ids, batch, max_new, speculative=None) -> dict:
    params = SamplingParams(max_new_tokens=max_new, temperature=0)
    with LLMEngine(model, tok, num_blocks=1024, max_num_seqs=batch, enable_prefix_caching=False,
                   speculative=speculative) as engine:
        engine.generate([ids[0][:32]], SamplingParams(max_new_tokens=4, temperature=0), use_tqdm=False)  # warm-up
        start = time.perf_counter()
        outs = engine.generate(ids, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        stats = engine.stats()
    tokens = sum(len(o.token_ids) for o in outs)
    row = {"tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed, "outputs": [o.token_ids for o in outs]}
    if speculative is not None:
        drafted = stats.get("spec_decode_num_draft_tokens", 0)
        row["acceptance"] = stats.get("spec_decode_num_accepted_tokens", 0) / drafted if drafted else 0.0
        row["drafted_per_token"] = drafted / tokens
    return row


def run_hf(model, tok, ids, max_new, k=None) -> dict:
    extra = {"prompt_lookup_num_tokens": k} if k else {}
    tokens, start = 0, time.perf_counter()
    outputs = []
    for row in ids:
        out = model.generate(torch.tensor([row]), attention_mask=torch.ones(1, len(row), dtype=torch.long),
                             max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id, **extra)
        new = out[0, len(row):].tolist()
        tokens += len(new)
        outputs.append(new)
    elapsed = time.perf_counter() - start
    return {"tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed, "outputs": outputs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,4,32")
    ap.add_argument("--workloads", default="grounded,chat")
    ap.add_argument("--methods", default="plain,ngram,draft,hf-ngram")
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("-k", type=int, default=5, help="most drafted tokens per step")
    ap.add_argument("--draft-noise", type=float, default=0.02)
    ap.add_argument("--json", default=None)
    ap.add_argument("--log", action="store_true", help="show the controller's on/off decisions")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (default torch's; 1 on a machine others share: OpenMP regions waiting on a "
                         "descheduled thread slow every step)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.log:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        logging.getLogger("hf_paged.engine.llm_engine").setLevel(logging.WARNING)
    methods = args.methods.split(",")
    model, tok = load_default_model(torch.float32)
    draft = None
    if "draft" in methods:
        draft = copy.deepcopy(model)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in draft.parameters():
                p.add_(torch.randn(p.shape, generator=g) * args.draft_noise * p.std())
    commit = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    load = " ".join(LOADAVG.read_text().split()[:3]) if LOADAVG.exists() else "?"
    print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit}, load {load}, torch threads "
          f"{torch.get_num_threads()}, SmolLM2-135M-Instruct fp32 greedy, max_new {args.max_new}, k {args.k}")
    print(f"{'workload':9} {'batch':>5} {'method':9} {'tok/s':>8} {'x plain':>8} {'accept':>7} {'drafted/tok':>11} "
          f"{'load':>5}")
    rows = []
    for workload in args.workloads.split(","):
        for batch in [int(b) for b in args.batches.split(",")]:
            ids = prompts(tok, workload, max(batch, 4))
            results: dict[str, dict] = {}

            def report(method: str, r: dict) -> None:
                results[method] = r
                plain = results.get("plain")
                same = r["outputs"] == plain["outputs"] if plain else None
                ratio = f"{r['tok_s'] / plain['tok_s']:8.2f}" if plain else f"{'-':>8}"
                accept = f"{r['acceptance']:7.2f}" if "acceptance" in r else f"{'-':>7}"
                drafted = f"{r['drafted_per_token']:11.2f}" if "drafted_per_token" in r else f"{'-':>11}"
                r["load"] = float(LOADAVG.read_text().split()[0]) if LOADAVG.exists() else 0.0
                print(f"{workload:9} {batch:5d} {method:9} {r['tok_s']:8.1f} {ratio} {accept} {drafted} "
                      f"{r['load']:5.2f}"
                      + ("" if same is not False else "  (outputs differ from plain)"), flush=True)
                rows.append({"workload": workload, "batch": batch, "method": method, "same_as_plain": same,
                             **{k: v for k, v in r.items() if k != "outputs"}})

            for method in methods:
                if method == "plain":
                    report(method, run_engine(model, tok, ids, batch, args.max_new))
                elif method == "ngram":
                    report(method, run_engine(model, tok, ids, batch, args.max_new,
                                              {"method": "ngram", "num_tokens": args.k}))
                elif method == "draft":
                    report(method, run_engine(model, tok, ids, batch, args.max_new,
                                              {"method": "draft", "num_tokens": args.k, "draft_model": draft}))
                elif method == "hf-ngram" and batch == 1:
                    report("hf-plain", run_hf(model, tok, ids, args.max_new))
                    report(method, run_hf(model, tok, ids, args.max_new, args.k))
            if "ngram" in results and "hf-ngram" in results:
                print(f"{'':15} ngram / hf-ngram: {results['ngram']['tok_s'] / results['hf-ngram']['tok_s']:.2f}",
                      flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
