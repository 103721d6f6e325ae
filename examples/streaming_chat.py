"""A plain Hugging Face script: a short chat whose answers stream token by token, ``model.generate`` running in a
thread and a ``TextIteratorStreamer`` handing the text to the main thread, the history growing turn by turn.

    python examples/streaming_chat.py [MODEL_DIR]

Add ``import hf_paged.auto`` as its first line and the answers stream from hf_paged's engine. MODEL_DIR (or
$HF_PAGED_EXAMPLE_MODEL) defaults to the embedded SmolLM2-135M-Instruct.
"""

import os
import sys
from threading import Thread

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

USER_TURNS = [
    "Hi! Can you suggest a name for a small grey cat?",
    "Why that name?",
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

    history = []
    for turn in USER_TURNS:
        history.append({"role": "user", "content": turn})
        inputs = tokenizer.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        thread = Thread(target=model.generate,
                        kwargs=dict(**inputs, streamer=streamer, max_new_tokens=24, do_sample=False))
        thread.start()
        print(f"User: {turn}\nAssistant: ", end="", flush=True)
        reply = ""
        for chunk in streamer:
            print(chunk, end="|", flush=True)  # "|" marks where each streamed chunk ended
            reply += chunk
        thread.join()
        print()
        history.append({"role": "assistant", "content": reply.strip()})


if __name__ == "__main__":
    main()
