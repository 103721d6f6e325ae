"""A plain Hugging Face script: load a causal LM and its tokenizer, answer a list of questions one by one with
``model.generate`` (greedy), print each answer.

    python examples/generate_loop.py [MODEL_DIR]

Add ``import hf_paged.auto`` as its first line and the same script generates on hf_paged's engine. MODEL_DIR
(or $HF_PAGED_EXAMPLE_MODEL) defaults to the embedded SmolLM2-135M-Instruct.
"""

import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Why is the sky blue?",
]


def model_dir() -> str:
    if len(sys.argv) > 1:
        return sys.argv[1]
    if os.environ.get("HF_PAGED_EXAMPLE_MODEL"):
        return os.environ["HF_PAGED_EXAMPLE_MODEL"]
    from hf_paged.models import default_model_dir

    return str(default_model_dir())


def main() -> None:
    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()

    for question in QUESTIONS:
        messages = [{"role": "user", "content": question}]
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
        output = model.generate(**inputs, max_new_tokens=24, do_sample=False)
        answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        print(f"Q: {question}\nA: {answer.strip()}\n")


if __name__ == "__main__":
    main()
