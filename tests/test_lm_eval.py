"""lm-evaluation-harness on a wrapped model, unchanged: ``lm_eval.simple_evaluate`` with ``HFLM(pretrained=<wrapped
model>)`` on a local 16-item ``generate_until`` task gives the plain model's answers item for item, and every
request runs on the engine (lm-eval passes its ``until`` strings as HF stopping criteria; no fallback)."""

from __future__ import annotations

import json
import logging

import lm_eval  # a test dependency: make test installs it

import hf_paged

QUESTIONS = [(f"What is {a} plus {b}?", str(a + b)) for a in range(1, 5) for b in range(2, 6)]  # 16: two batches


def _task_dir(tmp_path) -> str:
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"question": q, "answer": a}) for q, a in QUESTIONS) + "\n")
    (tmp_path / "local_sums.yaml").write_text(f"""task: local_sums
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "Question:"]
  max_gen_toks: 16
  do_sample: false
metric_list:
  - metric: exact_match
""")
    return str(tmp_path)


def _answers(model, tokenizer, task_dir: str) -> list[str]:
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8)
    tasks = TaskManager(include_path=task_dir, include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=["local_sums"], task_manager=tasks, log_samples=True,
                                  verbosity="ERROR")
    samples = sorted(out["samples"]["local_sums"], key=lambda s: s["doc_id"])
    return [s["resps"][0][0] for s in samples]


def test_lm_eval_generate_until_runs_on_the_engine_with_plain_answers(smollm2, tmp_path, caplog):
    model, tokenizer = smollm2
    task_dir = _task_dir(tmp_path)
    plain = _answers(model, tokenizer, task_dir)
    hf_paged.wrap(model, tokenizer)
    try:
        with caplog.at_level(logging.WARNING, logger="hf_paged"):
            paged = _answers(model, tokenizer, task_dir)
        engine = hf_paged.get_engine(model)
        assert engine.stats()["generation_tokens"] > 0
        assert not [r for r in caplog.records if "HF generate" in r.getMessage()]  # no fallback
    finally:
        hf_paged.unwrap(model)
    assert len(plain) == len(QUESTIONS) and paged == plain
