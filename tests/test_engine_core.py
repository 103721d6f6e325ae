"""One engine per model, owned and reversible: concurrent first callers share one engine; options are checked at
``wrap``; ``close`` / ``unwrap`` leave the model exactly as it was; engines with different options coexist; wrapped
models can be copied, pickled, saved and trained (the next call sees the new weights); ``PagedCache`` needs no size;
the plan is decided once per engine and every plan this CPU allows gives HF's tokens; streamed text; the null
block."""

from __future__ import annotations

import asyncio
import copy
import io
import logging
import threading
import time

import pytest
import torch

import hf_paged
from hf_paged import LLMEngine, PagedCache, SamplingParams
from hf_paged.core.scheduler import ScheduledSequence, SchedulerOutput
from hf_paged.detokenizer import IncrementalDetokenizer
from hf_paged.execution.patches.linear import amx_available

from conftest import build_tiny_model, engine_thread, left_pad, tiny_prompts
from test_engine import hf_greedy

GREEDY8 = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)


def _engines_of(model) -> list[LLMEngine]:
    from hf_paged.engine.llm_engine import _engines

    return [e for e in list(_engines) if e.model is model and not e.closed]


def _snapshot(model: torch.nn.Module) -> dict:
    """Everything wrap/engines could add or change on a model: instance attributes of the model and of every
    module (with the identity of what they hold), the attention setting of every config."""
    from hf_paged.execution.patches.attention import attention_configs

    return {
        "modules": {name: {k: id(v) for k, v in m.__dict__.items() if k not in ("_parameters", "_buffers",
                                                                            "_modules", "training")}
                    for name, m in model.named_modules()},
        "attn": [c._attn_implementation for c in attention_configs(model)],
    }


@pytest.fixture
def fresh_smollm2(smollm2):
    """A private copy of the session's SmolLM2 (tests here change weights and wrap it)."""
    model, tok = smollm2
    return copy.deepcopy(model), tok


def _plain_logits(model, row: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([row])).logits


def _wrap_and_generate(model, prompts: list[list[int]], max_new: int = 6) -> None:
    hf_paged.wrap(model, None, num_blocks=64)
    ids, mask = left_pad(prompts, 0)
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False)


# ---- one engine per model ----------------------------------------------------------------------
def test_concurrent_first_calls_share_one_engine(fresh_smollm2, chat_ids, monkeypatch):
    model, tok = fresh_smollm2
    import hf_paged.execution.executor as executor_module

    caches_made = []  # the engine's KV tensors: made by its executor, once per engine
    real_model_kv_cache = executor_module.model_kv_cache
    monkeypatch.setattr(executor_module, "model_kv_cache",
                        lambda *a, **k: caches_made.append(real_model_kv_cache(*a, **k)) or caches_made[-1])
    rows = [chat_ids[i % 8] for i in range(32)]  # 32 concurrent callers, 8 distinct prompts
    refs = {}
    for row in {tuple(r) for r in rows}:
        refs[row] = model.generate(torch.tensor([row]), max_new_tokens=8, do_sample=False)[0, len(row):].tolist()
    hf_paged.wrap(model, tok, memory_bytes=64 << 20)
    results: dict[int, list[int]] = {}
    errors = []
    barrier = threading.Barrier(32)

    def call(i: int) -> None:
        try:
            barrier.wait()
            out = model.generate(torch.tensor([rows[i]]), max_new_tokens=8, do_sample=False)
            results[i] = out[0, len(rows[i]):].tolist()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, errors
        assert len(_engines_of(model)) == 1
        assert len(caches_made) == 1
        engine = hf_paged.get_engine(model)
        assert engine.kv_cache is caches_made[0] and engine.runner.kv_cache is caches_made[0]
        assert engine.pool.num_blocks == caches_made[0].num_blocks
        assert engine.metrics.steps < 32 * 8  # they ran together
        for i, row in enumerate(rows):
            assert results[i] == refs[tuple(row)], i
    finally:
        hf_paged.unwrap(model)


def test_wrap_validates_options_up_front(smollm2):
    model, tok = smollm2
    for bad, name in [({"block_size": 0}, "block_size"), ({"memory_bytes": -5}, "memory_bytes"),
                      ({"bogus_option": 1}, "bogus_option"), ({"compile": "yes"}, "compile"),
                      ({"max_num_seqs": 2.5}, "max_num_seqs")]:
        with pytest.raises(ValueError, match=name):
            hf_paged.wrap(model, tok, **bad)
        assert "generate" not in model.__dict__
    with pytest.raises(ValueError, match="not wrapped"):
        hf_paged.get_engine(model)


def test_unwrap_leaves_the_model_as_it_was(tiny_model_dir):
    model = build_tiny_model("llama", tiny_model_dir)
    prompts = tiny_prompts(3, seed=21)
    before_logits = _plain_logits(model, prompts[0])
    before = _snapshot(model)
    _wrap_and_generate(model, prompts)
    engine = hf_paged.get_engine(model)
    thread = engine_thread(engine)
    hf_paged.unwrap(model)
    assert _snapshot(model) == before
    assert engine.closed and engine.kv_cache.kv.numel() == 0
    assert thread is None or not thread.is_alive()
    assert torch.equal(_plain_logits(model, prompts[0]), before_logits)


def test_close_stops_thread_frees_pool_and_refuses_work(tiny_model_dir):
    model = build_tiny_model("llama", tiny_model_dir)
    prompts = tiny_prompts(4, seed=22)
    refs = hf_greedy(model, prompts, 8, 0, set(), batch=4)
    before = _snapshot(model)
    with LLMEngine(model, None, num_blocks=64) as engine:
        assert [o.token_ids for o in engine.generate(prompts, GREEDY8, use_tqdm=False)] == refs
        running = engine.submit(prompts[0], SamplingParams(max_new_tokens=400, temperature=0, ignore_eos=True))
    assert running.done.wait(10) and running.finish_reason == hf_paged.FinishReason.ABORT
    assert engine.closed and engine.kv_cache.kv.numel() == 0 and engine.pool.num_free_blocks == engine.pool.num_blocks
    assert engine_thread(engine) is None
    assert _snapshot(model) == before
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit(prompts[0], GREEDY8)


def test_an_engine_dropped_without_close_is_freed(tiny_model_dir):
    """Its idle thread holds it only weakly: dropping the last reference frees the engine (pool, packed weights) at
    once, not when the thread's idle timeout ends; the model is as it was."""
    import gc
    import weakref

    model = build_tiny_model("llama", tiny_model_dir)
    prompts = tiny_prompts(3, seed=26)
    before = _snapshot(model)
    engine = LLMEngine(model, None, num_blocks=64)
    engine.generate(prompts, GREEDY8, use_tqdm=False)
    thread, gone = engine_thread(engine), weakref.ref(engine)
    assert thread is not None and thread.is_alive()
    del engine
    deadline = time.monotonic() + 5
    while gone() is not None and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.05)
    assert gone() is None
    assert _snapshot(model) == before


def test_engines_with_different_options_coexist_on_one_model(tiny_model_dir):
    """Each engine's options act only inside its own forwards: two engines on one model, run at the same time
    from two threads, each give HF's tokens, and the model's plain forward is untouched."""
    model = build_tiny_model("llama", tiny_model_dir)
    prompts = tiny_prompts(6, seed=23)
    refs = hf_greedy(model, prompts, 8, 0, set(), batch=6)
    plain = _plain_logits(model, prompts[0])
    fast = LLMEngine(model, None, num_blocks=64)
    slow = LLMEngine(model, None, num_blocks=64, pack_weights=False, cpu_kernels=False, max_num_batched_tokens=8)
    assert fast.plan != slow.plan
    outs = {}
    threads = [threading.Thread(target=lambda e=e, k=k: outs.__setitem__(k, e.generate(prompts, GREEDY8,
                                                                                       use_tqdm=False)))
               for k, e in (("fast", fast), ("slow", slow))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for key in ("fast", "slow"):
        assert [o.token_ids for o in outs[key]] == refs, key
    assert torch.equal(_plain_logits(model, prompts[0]), plain)
    fast.close()
    slow.close()


# ---- copies, saves, training -------------------------------------------------------------------
@pytest.mark.parametrize("when", ["before", "after"])
def test_copies_and_saves_of_a_wrapped_model_generate_hf_tokens(tiny_model_dir, tmp_path, when):
    model = build_tiny_model("llama", tiny_model_dir)
    prompts = tiny_prompts(3, seed=24)
    refs = hf_greedy(model, prompts, 8, 0, set(), batch=3)
    hf_paged.wrap(model, None, num_blocks=64)
    ids, mask = left_pad(prompts, 0)

    def greedy(m):
        out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None)
        return out[:, ids.shape[1]:].tolist()

    if when == "after":
        assert greedy(model) == refs
    copies = {"deepcopy": copy.deepcopy(model)}
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies["torch.save"] = torch.load(buffer, weights_only=False)
    model.save_pretrained(tmp_path / "saved")
    copies["save_pretrained"] = type(model).from_pretrained(tmp_path / "saved")
    try:
        assert copies["save_pretrained"].config._attn_implementation == model.config._attn_implementation
        for name, other in copies.items():
            assert greedy(other) == refs, name
        assert hf_paged.api.is_wrapped(copies["deepcopy"]) and hf_paged.api.is_wrapped(copies["torch.save"])
        assert hf_paged.get_engine(copies["deepcopy"]) is not hf_paged.get_engine(model)
    finally:
        for other in copies.values():
            hf_paged.unwrap(other)
        hf_paged.unwrap(model)


def test_copy_of_a_wrapped_gemma2_keeps_its_eager_softcapping(tiny_model_dir):
    model = build_tiny_model("gemma2", tiny_model_dir)
    prompts = tiny_prompts(2, seed=25)
    before = _plain_logits(model, prompts[0])
    _wrap_and_generate(model, prompts)
    clone = copy.deepcopy(model)
    try:
        assert clone.config._attn_implementation == "eager"
        assert torch.equal(_plain_logits(clone, prompts[0]), before)
    finally:
        hf_paged.unwrap(clone)
        hf_paged.unwrap(model)


@pytest.mark.parametrize("pack", [True, False])
def test_generate_after_an_optimizer_step_equals_hf(fresh_smollm2, chat_ids, pack):
    """The RL-loop case: generate, one SGD step on the same model, generate again. The old tokens came from the
    prefix cache (K/V of the chat template's shared system prompt computed with the old weights) and, with packing
    on, from packed copies of the old weights; both are refreshed when the weights change."""
    model, tok = fresh_smollm2
    rows = chat_ids[:4]
    hf_paged.wrap(model, tok, memory_bytes=64 << 20, pack_weights=pack)
    try:
        for _ in range(2):
            model.generate(**_batch(rows, tok), max_new_tokens=16, do_sample=False)
        assert hf_paged.get_engine(model).pool.prefix_hits > 0  # the prompts were cached
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        model.train()
        loss = model(input_ids=torch.tensor([rows[0]]), labels=torch.tensor([rows[0]])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.eval()
        ours = model.generate(**_batch(rows, tok), max_new_tokens=16, do_sample=False)
    finally:
        hf_paged.unwrap(model)
    expected = model.generate(**_batch(rows, tok), max_new_tokens=16, do_sample=False)
    assert torch.equal(ours, expected)


def test_load_state_dict_between_calls_is_seen(tiny_model_dir):
    model = build_tiny_model("llama", tiny_model_dir)
    other = build_tiny_model("llama", tiny_model_dir)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    prompts = tiny_prompts(3, seed=26)
    refs = hf_greedy(other, prompts, 8, 0, set(), batch=3)
    with LLMEngine(model, None, num_blocks=64) as engine:
        before = [o.token_ids for o in engine.generate(prompts, GREEDY8, use_tqdm=False)]
        model.load_state_dict(other.state_dict())
        after = [o.token_ids for o in engine.generate(prompts, GREEDY8, use_tqdm=False)]
    assert after == refs and before != refs


def _batch(rows, tok):
    ids, mask = left_pad(rows, tok.pad_token_id)
    return {"input_ids": ids, "attention_mask": mask}


# ---- PagedCache without a size -----------------------------------------------------------------
def test_paged_cache_without_a_size_grows_on_demand(tiny_model_dir):
    model = build_tiny_model("llama", tiny_model_dir)
    ids, mask = left_pad(tiny_prompts(3, seed=5, low=50, high=80), 0)
    batch = {"input_ids": ids, "attention_mask": mask}
    expected = model.generate(**batch, max_new_tokens=40, do_sample=False, eos_token_id=None)
    cache = PagedCache(model)
    start = cache.pool.num_blocks
    assert cache.kv_cache.num_blocks == start == PagedCache.INITIAL_BLOCKS
    assert ids.numel() <= start * cache.pool.block_size < expected.numel()  # the prompts fit; the answers do not
    try:
        out = model.generate(**batch, max_new_tokens=40, do_sample=False, eos_token_id=None, past_key_values=cache)
        assert cache.pool.num_blocks > start  # it grew: the pool's count and the tensors together
        assert cache.kv_cache.num_blocks == cache.pool.num_blocks
        assert cache.kv_cache.kv.shape[2] == cache.pool.num_blocks + 1
    finally:
        cache.free()
    assert torch.equal(out, expected)


# ---- the plan ----------------------------------------------------------------------------------
def _allowed_plans() -> list[dict]:
    plans = [dict(pack_weights=False, cpu_kernels=False), dict(pack_weights=True, cpu_kernels=False),
             dict(pack_weights=False, cpu_kernels=True), dict(pack_weights=True, fuse_layers=False),
             dict(pack_weights=True, fuse_layers=True)]
    return plans


@pytest.mark.parametrize("options", _allowed_plans(), ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_every_cpu_plan_gives_hf_tokens(tiny_model_dir, cpu_kernels, options, caplog):
    model = build_tiny_model("llama", tiny_model_dir)
    prompts = tiny_prompts(5, seed=27)
    refs = hf_greedy(model, prompts, 8, 0, set(), batch=5)
    with caplog.at_level(logging.INFO, logger="hf_paged.engine.llm_engine"):
        engine = LLMEngine(model, None, num_blocks=64, max_num_batched_tokens=24, **options)
    assert sum("hf_paged engine for" in r.message for r in caplog.records) == 1
    plan = engine.plan
    assert plan.cpu_kernels == options.get("cpu_kernels", True)
    assert (plan.linears != "torch") == options["pack_weights"]
    assert plan.fused_layers == (options["pack_weights"] and options.get("cpu_kernels", True)
                                 and options.get("fuse_layers", True))
    with engine:
        assert [o.token_ids for o in engine.generate(prompts, GREEDY8, use_tqdm=False)] == refs


@pytest.mark.skipif(not amx_available(), reason="no AMX tiles on this CPU")
def test_bf16_plan_with_amx_forced_off(tiny_model_dir):
    model = build_tiny_model("llama", tiny_model_dir).to(torch.bfloat16)
    assert LLMEngine(model, None, num_blocks=16).plan.linears == "amx"
    with LLMEngine(model, None, num_blocks=16, amx=False) as engine:
        assert engine.plan.linears in ("avx512", "onednn")
        assert engine.plan.one_call_layers == (engine.plan.linears == "avx512")  # the one-call layer needs hf_paged's GEMMs
        assert len(engine.generate(tiny_prompts(2, seed=28), GREEDY8, use_tqdm=False)[0].token_ids) == 8


def test_plan_is_decided_once_not_per_call(tiny_model_dir, cpu_kernels, monkeypatch):
    """The environment is read when the engine is built: switching the kernels off afterwards changes nothing."""
    model = build_tiny_model("llama", tiny_model_dir)
    prompts = tiny_prompts(3, seed=29)
    from hf_paged.execution.kernels import cpu_decode_attention

    calls = []
    real = cpu_decode_attention.DecodePlan.__call__
    monkeypatch.setattr(cpu_decode_attention.DecodePlan, "__call__", lambda *a, **k: calls.append(1) or real(*a, **k))
    with LLMEngine(model, None, num_blocks=64, fuse_layers=False) as engine:
        monkeypatch.setenv("HF_PAGED_CPU_KERNEL", "0")
        engine.generate(prompts, GREEDY8, use_tqdm=False)
    assert calls and engine.plan.attention == "c"


# ---- streamed text -----------------------------------------------------------------------------
def test_stream_text_deltas_add_up_and_hide_stop_strings(smollm2, chat_ids):
    model, tok = smollm2
    with LLMEngine(model, tok, num_blocks=256) as engine:
        params = SamplingParams(max_new_tokens=48, temperature=0, logprobs=True, top_logprobs=3)
        whole = engine.generate([chat_ids[0]], params, use_tqdm=False)[0]
        deltas = list(engine.stream_text(chat_ids[0], params))
        assert "".join(d.text for d in deltas) == whole.text
        assert [t for d in deltas for t in d.token_ids] == whole.token_ids
        assert [x for d in deltas if d.logprobs for x in d.logprobs] == pytest.approx(whole.logprobs, abs=1e-3)
        assert all(len(top) == 3 and top[0][1] >= top[-1][1] for top in whole.top_logprobs)
        assert deltas[-1].finish_reason is not None and deltas[-1].output.token_ids == whole.token_ids
        # A stop string: never streamed, the text ends just before it.
        word = whole.text.split()[3]
        stop = SamplingParams(max_new_tokens=48, temperature=0, stop=[word])
        streamed = list(engine.stream_text(chat_ids[0], stop))
        text = "".join(d.text for d in streamed)
        assert word not in text and whole.text.startswith(text) and streamed[-1].output.text == text


def test_leaving_a_stream_early_aborts_and_frees(smollm2, chat_ids):
    model, tok = smollm2
    with LLMEngine(model, tok, num_blocks=256) as engine:
        params = SamplingParams(max_new_tokens=500, temperature=0, ignore_eos=True)
        for i, delta in enumerate(engine.stream_text(chat_ids[1], params)):
            if i == 3:
                break
        async def consume_some():
            agen = engine.astream_text(chat_ids[2], params)
            got = [await agen.__anext__() for _ in range(3)]
            await agen.aclose()
            return got

        assert len(asyncio.run(consume_some())) == 3
        engine.generate([chat_ids[0]], GREEDY8, use_tqdm=False)  # a step after the aborts
        assert engine.pool.num_free_blocks == engine.pool.num_blocks
        assert engine.stats()["running"] == 0


def test_async_streams_interleave(smollm2, chat_ids):
    model, tok = smollm2
    with LLMEngine(model, tok, num_blocks=256) as engine:
        params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
        expected = [o.text for o in engine.generate(chat_ids[:2], params, use_tqdm=False)]
        order = []

        async def consume(i):
            text = ""
            async for delta in engine.astream_text(chat_ids[i], params):
                order.append(i)
                text += delta.text
            return text

        async def both():
            return await asyncio.gather(consume(0), consume(1))

        assert asyncio.run(both()) == expected
        assert order != sorted(order)  # the two streams advanced together


def test_incremental_detokenizer_keeps_multibyte_characters_whole(smollm2):
    _, tok = smollm2
    text = "Café ☕ 東京タワー 🚀🎉 naïve — “quotes” done."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tok, tok("Hi", add_special_tokens=False)["input_ids"])
    pieces = [detok.add(t) for t in ids] + [detok.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert len(detok.token_ids) <= 40  # the decode window stays short


# ---- memory ------------------------------------------------------------------------------------
def test_padded_block_tables_point_at_the_null_block(tiny_model_dir, monkeypatch):
    import hf_paged.execution.model_runner as runner_module

    model = build_tiny_model("llama", tiny_model_dir)
    with LLMEngine(model, None, num_blocks=32, block_size=4) as engine:
        pool, kv_cache = engine.pool, engine.kv_cache
        assert pool.null_block == pool.num_blocks == kv_cache.null_block
        assert kv_cache.kv.shape[2] == pool.num_blocks + 1
        seen = {}
        real = runner_module.build_step_inputs

        def spy(step, *args):
            assert isinstance(step, SchedulerOutput)  # the step reaches the runner as plain data
            assert all(isinstance(seq, ScheduledSequence) for seq in step.seqs)
            out = real(step, *args)
            seen.setdefault("tables", []).append((out.meta.block_tables.clone(), list(out.meta.kv_lens_list)))
            return out
        monkeypatch.setattr(runner_module, "build_step_inputs", spy)
        engine.generate([[5] * 3, [6] * 14], SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True),
                        use_tqdm=False)
        tables, lens = seen["tables"][0]
        short = min(range(len(lens)), key=lens.__getitem__)
        used = -(-lens[short] // 4)
        assert (tables[short, used:] == pool.null_block).all()
        assert pool.null_block not in {b for row in tables.tolist() for b in row[:used]}
        blocks = [pool.allocate() for _ in range(pool.num_blocks)]
        assert pool.null_block not in blocks
        for b in blocks:
            pool.decref(b)
