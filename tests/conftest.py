"""Shared fixtures: the embedded SmolLM2 model, tiny random models of several architectures (saved as
safetensors and reloaded through ``from_pretrained``), and the leak check run after every test: every
block pool created during a test must have all its blocks free when the test ends."""

from __future__ import annotations

import os
import weakref

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist the workers share the cores: each gets its share of threads instead of all of them.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hf_paged.core.block_pool import BlockPool

CHAT_PROMPTS = [
    "Write a haiku about the sea.", "What is 2+2?", "Tell me about the history of Rome.", "List three fruits.",
    "Explain photosynthesis to a child.", "Translate 'good morning' into French.", "What is a prime number?",
    "Give me a recipe for pancakes.", "Why is the sky blue?", "Describe a cat in one sentence.",
    "What is the capital of Japan?", "Write a limerick about a programmer.", "How do airplanes fly?",
    "Name the planets of the solar system.", "What does a compiler do?", "Suggest a name for a dog.",
    "Summarise the plot of Romeo and Juliet.", "How many legs does a spider have?",
    "What is the boiling point of water?", "Write a short poem about autumn leaves.",
    "Explain what a neural network is.", "Who wrote Pride and Prejudice?", "What is the speed of light?",
    "Give three tips for better sleep.", "What is the largest ocean?", "Describe the taste of lemon.",
    "How do bees make honey?", "What is 15 times 3?", "Tell me a fun fact about octopuses.",
    "What is the difference between weather and climate?", "Write a tweet about coffee.",
    "Why do leaves change colour in autumn?",
]

# ---- leak check --------------------------------------------------------------------------------
_pools: "weakref.WeakSet[BlockPool]" = weakref.WeakSet()
_original_init = BlockPool.__init__


def _tracking_init(self, *args, **kwargs):
    _original_init(self, *args, **kwargs)
    _pools.add(self)


BlockPool.__init__ = _tracking_init


@pytest.fixture(autouse=True)
def no_leaked_blocks():
    before = set(id(p) for p in _pools)
    yield
    for pool in list(_pools):
        if id(pool) in before:
            continue
        assert pool.num_free_blocks == pool.num_blocks, (
            f"leak: {pool.num_blocks - pool.num_free_blocks} KV blocks still in use after the test")
        assert all(c == 0 for c in pool.ref_counts)


# ---- models ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def smollm2():
    from hf_paged.models import load_default_model

    torch.manual_seed(0)
    model, tokenizer = load_default_model()
    tokenizer.padding_side = "left"
    return model, tokenizer


@pytest.fixture(scope="session")
def chat_ids(smollm2):
    """Token ids of the chat prompts, through the model's chat template."""
    _, tok = smollm2
    out = []
    for p in CHAT_PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)

TINY_CONFIGS = {
    "llama": dict(model_type="llama", **_COMMON),
    "mistral": dict(model_type="mistral", sliding_window=12, **_COMMON),
    "qwen2": dict(model_type="qwen2", **_COMMON),
    "qwen3": dict(model_type="qwen3", head_dim=16, **_COMMON),
    "gpt2": dict(model_type="gpt2", vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=512),
    "gpt_neox": dict(model_type="gpt_neox", vocab_size=256, hidden_size=64, intermediate_size=128,
                     num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512, rotary_pct=0.5),
    "phi3": dict(model_type="phi3", pad_token_id=0, **_COMMON),
    "gemma2": dict(model_type="gemma2", head_dim=16, sliding_window=12, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0, query_pre_attn_scalar=16, **_COMMON),
}
# Soft-capping is only computed by the eager implementation; sdpa would ignore it.
TINY_ATTN = {"gemma2": "eager"}


def build_tiny_model(name: str, folder) -> torch.nn.Module:
    spec = dict(TINY_CONFIGS[name])
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(model_type, **spec)
    config.bos_token_id, config.eos_token_id = 1, 2
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(config)
    path = folder / name
    model.save_pretrained(path, safe_serialization=True)
    kwargs = {"attn_implementation": TINY_ATTN[name]} if name in TINY_ATTN else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session", params=list(TINY_CONFIGS))
def tiny_model(request, tiny_model_dir):
    return request.param, build_tiny_model(request.param, tiny_model_dir)


def tiny_prompts(n: int, seed: int = 0, low: int = 3, high: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (n,), generator=g).tolist()
    return [torch.randint(3, 256, (length,), generator=g).tolist() for length in lengths]


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


# ---- the OpenAI-compatible server (tests/test_server*.py) --------------------------------------
@pytest.fixture(scope="session")
def hf_paged_server():
    """``python -m hf_paged.serve`` (SmolLM2, served as "smollm2") on a free loopback port, started once for the
    server tests and stopped with SIGTERM at the end of the session, which must exit 0. Failing to start fails."""
    from server_process import launch_hf_paged

    server = launch_hf_paged(["--served-model-name", "smollm2", "--kv-memory", "256MiB",
                              "--disable-access-log", "--log-level", "warning"], start_timeout=180)
    with server:
        yield server
    assert server.returncode == 0, f"the server exited with {server.returncode}:\n{server.log_tail()}"


# ---- C kernels: skip where they cannot be built, except in CI ------------------------------------
@pytest.fixture(scope="session")
def cpu_kernels():
    """Tests of the C kernels use this: where the library cannot be built they skip, but under ``CI=true`` they
    fail (a broken build must not land green)."""
    from hf_paged.execution.kernels import cpu_library

    if cpu_library.load() is None:
        message = f"the C CPU kernels could not be built here: {cpu_library.failure()}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message + " (CI=true: required)")
        pytest.skip(message)
    return cpu_library


needs_cpu_kernels = pytest.mark.usefixtures("cpu_kernels")


def engine_thread(engine) -> "threading.Thread | None":
    """The engine's step thread if one is alive (found by the name it gives its thread)."""
    import threading

    name = f"hf_paged-engine-{id(engine):x}"
    return next((t for t in threading.enumerate() if t.name == name), None)
