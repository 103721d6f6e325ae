"""Third-party clients on a wrapped model against the same model plain, side by side in one run: lm-evaluation-harness
``generate_until`` (``HFLM(pretrained=model)``, the same ``batch_size``) on a local 48-item task, short answers and a
chain-of-thought style task generating at least 128 tokens per item; and TRL's ``GRPOTrainer`` (``use_vllm=False``):
the time of its generation phase (``_generate_single_turn``) over a few steps, plain ``generate``, wrapped, and
transformers' own continuous batching (``use_transformers_paged=True``).

    benchmarks/clients.py [--batch-size 8] [--items 48] [--dtype float32] [--tasks short,cot,grpo] [--grpo-steps 3]

Prints each lm-eval task's wall time plain and wrapped (the engine started before the clock: a process pays that once), the
ratio, whether the answers are identical, and the tokens the engine generated per item.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

TASKS = {  # name: (prompt template, until, max_gen_toks)
    "short": ('Question: {{question}}\\nAnswer:', '["\\\\n", "Question:"]', 24),
    "cot": ("Question: {{question}} Explain, step by step and at length, how to work it out, with an example of "
            "each step.\\nLet's think step by step.\\n", '["\\n\\n\\n\\n"]', 256),
}


def write_task(folder: Path, name: str, items: int) -> None:
    data = folder / f"{name}.jsonl"
    rows = [{"question": f"What is {a} times {b}?", "answer": str(a * b)} for a in range(2, 40) for b in range(3, 9)]
    data.write_text("\n".join(json.dumps(r) for r in rows[:items]) + "\n")
    text, until, max_toks = TASKS[name]
    (folder / f"{name}.yaml").write_text(
        f"task: clients_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f'test_split: test\noutput_type: generate_until\ndoc_to_text: "{text}"\ndoc_to_target: "{{{{answer}}}}"\n'
        f"generation_kwargs:\n  until: {until}\n  max_gen_toks: {max_toks}\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")


def evaluate(model, tokenizer, task: str, folder: str, batch_size: int) -> tuple[float, list[str]]:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    tasks = TaskManager(include_path=folder, include_defaults=False)
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=[f"clients_{task}"], task_manager=tasks, log_samples=True,
                                  verbosity="ERROR")
    seconds = time.perf_counter() - start
    samples = sorted(out["samples"][f"clients_{task}"], key=lambda s: s["doc_id"])
    return seconds, [s["resps"][0][0] for s in samples]


def grpo_generation_seconds(model, tokenizer, mode: str, steps: int) -> tuple[float, float]:
    """(seconds in GRPO's generation phase, seconds of the whole training) for ``steps`` steps."""
    import tempfile as tmp

    import datasets
    import trl

    import hf_paged

    spent = [0.0]
    original = trl.GRPOTrainer._generate_single_turn

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start

    prompts = [f"Write a short poem about the number {i}." for i in range(64)]
    args = trl.GRPOConfig(output_dir=tmp.mkdtemp(), per_device_train_batch_size=16, num_generations=8,
                          max_completion_length=64, max_steps=steps, learning_rate=1e-6, report_to=[], use_cpu=True,
                          save_strategy="no", bf16=False, disable_tqdm=True,
                          use_transformers_paged=mode == "transformers_paged")
    if mode == "wrapped":
        hf_paged.wrap(model, tokenizer)
        model.generate(**tokenizer(["Warm up"], return_tensors="pt"), max_new_tokens=2)  # the engine starts
    trl.GRPOTrainer._generate_single_turn = timed
    try:
        trainer = trl.GRPOTrainer(model=model, args=args, processing_class=tokenizer,
                                  reward_funcs=lambda completions, **_: [float(len(c)) for c in completions],
                                  train_dataset=datasets.Dataset.from_dict({"prompt": prompts}))
        start = time.perf_counter()
        trainer.train()
        return spent[0], time.perf_counter() - start
    finally:
        trl.GRPOTrainer._generate_single_turn = original
        if mode == "wrapped":
            hf_paged.unwrap(model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--items", type=int, default=48)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tasks", default=",".join([*TASKS, "grpo"]))
    ap.add_argument("--grpo-steps", type=int, default=3)
    args = ap.parse_args()

    import torch

    import hf_paged
    from hf_paged.models import load_default_model

    torch.set_num_threads(2)
    model, tokenizer = load_default_model(dtype=getattr(torch, args.dtype))
    tokenizer.padding_side = "left"
    folder = Path(tempfile.mkdtemp(prefix="hf-paged-clients-"))
    rows, grpo = [], []
    tasks = args.tasks.split(",")
    if "grpo" in tasks:
        tasks.remove("grpo")
        for mode in ("plain", "wrapped", "transformers_paged"):
            fresh, _ = load_default_model(dtype=getattr(torch, args.dtype))
            try:
                grpo.append((mode, *grpo_generation_seconds(fresh, tokenizer, mode, args.grpo_steps)))
            except Exception as exc:  # a peer that cannot run here is reported, not fatal
                grpo.append((mode, None, f"{type(exc).__name__}: {exc}"[:120]))
    for task in tasks:
        write_task(folder, task, args.items)
        plain_s, plain = evaluate(model, tokenizer, task, str(folder), args.batch_size)
        hf_paged.wrap(model, tokenizer)
        try:
            model.generate(**tokenizer(["Warm up"], return_tensors="pt"), max_new_tokens=2)  # the engine starts
            engine = hf_paged.get_engine(model)
            before = engine.stats()["generation_tokens"]
            paged_s, paged = evaluate(model, tokenizer, task, str(folder), args.batch_size)
            tokens = engine.stats()["generation_tokens"] - before
        finally:
            hf_paged.unwrap(model)
        same = sum(a == b for a, b in zip(plain, paged))
        rows.append((task, plain_s, paged_s, same, len(plain), tokens / len(plain)))
    if grpo:
        print(f"\nTRL GRPOTrainer, {args.grpo_steps} steps of 16 completions x 64 tokens, {args.dtype}")
        print("| generation | generation phase (s) | training (s) | generation vs plain |\n|---|---:|---:|---:|")
        plain_gen = grpo[0][1]
        for mode, gen_s, total in grpo:
            if gen_s is None:
                print(f"| {mode} | failed: {total} | | |")
            else:
                print(f"| {mode} | {gen_s:.1f} | {total:.1f} | {plain_gen / gen_s:.2f}x |")
    if not rows:
        return
    print(f"\nlm-eval generate_until, {args.items} items, batch_size {args.batch_size}, {args.dtype}")
    print("| task | plain HF (s) | wrapped (s) | speed-up | same answers | tokens per item (engine) |\n"
          "|---|---:|---:|---:|---:|---:|")
    for task, plain_s, paged_s, same, n, per_item in rows:
        print(f"| {task} | {plain_s:.1f} | {paged_s:.1f} | {plain_s / paged_s:.2f}x | {same}/{n} | {per_item:.0f} |")


if __name__ == "__main__":
    main()
