"""The CPU speed paths keep HF's greedy tokens: the compiled decoder layers (a graph or two for all layers and
step shapes), the packed oneDNN linears (call-scoped: a plain forward is untouched), and the process-level CPU
settings."""

import sys
import threading
from pathlib import Path

import pytest
import torch

from hf_paged import LLMEngine, SamplingParams
from hf_paged.cpu_runtime import empty_on_huge_pages, release_openmp_pool, tune_malloc
from hf_paged.execution.patches.linear import build_packers, packed_linears

from conftest import build_tiny_model, tiny_prompts
from test_engine import hf_greedy

GREEDY24 = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)


# Graphs: one for single-token steps and one for the rest, per kind of layer (gemma2 alternates sliding-window and
# global layers), never one per layer or per step shape. gemma2: sliding window + soft-capping.
@pytest.mark.parametrize("arch,max_graphs", [("llama", 2), ("qwen3", 2), ("gemma2", 4)])
def test_compiled_engine_equals_hf_with_few_graphs(arch, max_graphs, tiny_model_dir):
    model = build_tiny_model(arch, tiny_model_dir)
    prompts = tiny_prompts(6, seed=5)
    refs = hf_greedy(model, prompts, 24, 0, set(), batch=6)
    torch._dynamo.reset()
    stats = torch._dynamo.utils.counters["stats"]
    graphs_before = stats["unique_graphs"]
    engine = LLMEngine(model, None, num_blocks=200, max_num_batched_tokens=16, enable_prefix_caching=False,
                       compile=True)
    # One request alone first (single-token decode steps, one sampled row), then a ragged batch with
    # chunked prefills mixed with decodes.
    first = engine.generate(prompts[:1], GREEDY24, use_tqdm=False)
    outs = engine.generate(prompts, GREEDY24, use_tqdm=False)
    assert first[0].token_ids == refs[0]
    assert [o.token_ids for o in outs] == refs
    assert engine.runner.compiled
    assert 1 <= stats["unique_graphs"] - graphs_before <= max_graphs
    # The compiled engine leaves plain forwards of the model as they were.
    ids = torch.tensor([prompts[0]])
    with torch.inference_mode():
        assert model(ids).logits.shape == (1, len(prompts[0]), model.config.vocab_size)


def test_packed_linears_are_call_scoped(smollm2, chat_ids):
    model, tok = smollm2
    ids = torch.tensor([chat_ids[0]])
    with torch.inference_mode():
        before = model(ids).logits
        packers = build_packers(model, "onednn")
        assert packers and not any("forward" in m.__dict__ for m in model.modules())  # built, not installed
        for module, forward in packers.items():  # installed, as an engine's runner does around its forwards
            module.__dict__["forward"] = forward
        try:
            plain = model(ids).logits
            with packed_linears():
                packed = model(ids).logits
            seen = []
            # The flag is per thread: another thread's forward during a packed call stays plain.
            with packed_linears():
                t = threading.Thread(target=lambda: seen.append(model(ids).logits))
                t.start()
                t.join()
        finally:
            for module in packers:
                del module.__dict__["forward"]
        after = model(ids).logits
    assert torch.equal(before, plain) and torch.equal(before, after) and torch.equal(before, seen[0])
    torch.testing.assert_close(packed, before, atol=1e-3, rtol=1e-3)  # fp32 over 30 layers


def test_engine_with_and_without_packed_weights_agree(smollm2, chat_ids):
    model, tok = smollm2
    params = SamplingParams(max_new_tokens=24, temperature=0, logprobs=1)
    outs = {}
    for pack in (False, True):
        engine = LLMEngine(model, tok, num_blocks=512, enable_prefix_caching=False, pack_weights=pack)
        outs[pack] = engine.generate(chat_ids[:16], params, use_tqdm=False)
        assert engine.runner.packed == pack
        engine.close()
    assert [o.token_ids for o in outs[True]] == [o.token_ids for o in outs[False]]
    for a, b in zip(outs[True], outs[False]):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-3, rtol=0)


def test_cpu_runtime_settings_apply():
    torch.ones(1 << 16).sum()  # make sure this thread has run torch (and so loaded its OpenMP runtime)
    assert release_openmp_pool() is True
    assert tune_malloc() is True
    assert torch.ones(1 << 16).sum().item() == 1 << 16  # the pool comes back by itself


def _anon_huge_kb(address: int) -> int:
    """AnonHugePages of the mapping of this process that holds ``address``."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    return 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")
def test_packed_weights_are_carved_onto_huge_pages(monkeypatch):
    monkeypatch.setenv("HF_PAGED_TUNE_CPU", "1")
    small = [empty_on_huge_pages(n, dtype) for n, dtype in ((1000, torch.float32), (3, torch.bfloat16),
                                                              (5000, torch.float32))]
    assert all(t.data_ptr() % 64 == 0 and t.is_contiguous() for t in small)
    assert [t.numel() for t in small] == [1000, 3, 5000] and small[1].dtype == torch.bfloat16
    # Side by side in one chunk, none overlapping the next.
    assert small[0].data_ptr() + 4000 <= small[1].data_ptr() < small[1].data_ptr() + 6 <= small[2].data_ptr()
    large = empty_on_huge_pages(24 << 20, torch.float32)  # 96 MB: a mapping of its own, from a huge-page boundary
    assert large.data_ptr() % (2 << 20) == 0
    large.fill_(1.0)
    for t in small:
        t.zero_()
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[never]" not in thp.read_text():
        assert _anon_huge_kb(large.data_ptr()) >= 2048
        assert _anon_huge_kb(small[0].data_ptr()) >= 2048
