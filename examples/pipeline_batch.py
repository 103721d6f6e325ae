"""A plain Hugging Face script: a text-generation ``pipeline`` over a list of prompts (greedy), printing each
completion.

    python examples/pipeline_batch.py [MODEL_DIR]

Add ``import hf_paged.auto`` as its first line and the whole list runs as one continuous batch on hf_paged's
engine. MODEL_DIR (or $HF_PAGED_EXAMPLE_MODEL) defaults to the embedded SmolLM2-135M-Instruct.
"""

import os
import sys

import torch
from transformers import pipeline

PROMPTS = [
    "The three most important inventions of the last century are",
    "A good way to start learning to program is",
    "The recipe for a simple tomato soup:",
    "In the middle of the forest there was",
    "The main differences between cats and dogs are",
    "My favourite season is autumn because",
]


def model_dir() -> str:
    if len(sys.argv) > 1:
        return sys.argv[1]
    if os.environ.get("HF_PAGED_EXAMPLE_MODEL"):
        return os.environ["HF_PAGED_EXAMPLE_MODEL"]
    from hf_paged.models import default_model_dir

    return str(default_model_dir())


def main() -> None:
    generator = pipeline("text-generation", model=model_dir(), dtype=torch.float32)
    results = generator(PROMPTS, max_new_tokens=16, do_sample=False, batch_size=4)
    for prompt, result in zip(PROMPTS, results):
        print(repr(result[0]["generated_text"]))


if __name__ == "__main__":
    main()
