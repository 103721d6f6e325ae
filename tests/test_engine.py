"""The continuous-batching engine against HF generate (greedy, fp32, token for token), under batching,
chunked prefill and preemption; seeded sampling independent of the batch; aborts, errors and bad input."""

import threading
import time

import pytest
import torch

from hf_paged import FinishReason, LLMEngine, SamplingParams

from conftest import engine_thread, left_pad, tiny_prompts

MAX_NEW = 32
GREEDY = SamplingParams(max_new_tokens=MAX_NEW, temperature=0)


def _trim_at_eos(row: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(row):
        if t in eos:
            return row[: i + 1]
    return row


def hf_greedy(model, prompts, max_new, pad, eos, batch=16):
    """HF generate's greedy continuations (padded batches, trimmed after eos; no eos: exactly max_new)."""
    out = []
    for i in range(0, len(prompts), batch):
        ids, mask = left_pad(prompts[i : i + batch], pad)
        extra = {} if eos else {"eos_token_id": None}
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False, **extra)
        out.extend(_trim_at_eos(r, eos) for r in gen[:, ids.shape[1]:].tolist())
    return out


@pytest.fixture(scope="module")
def smol_refs(smollm2, chat_ids):
    model, tok = smollm2
    return hf_greedy(model, chat_ids, MAX_NEW, tok.pad_token_id, {tok.eos_token_id})


@pytest.mark.parametrize("max_num_seqs,budget", [(1, 2048), (7, 2048), (64, 2048), (7, 16)],
                         ids=["batch1", "batch7", "batch64", "batch7-chunked16"])
def test_greedy_equals_hf(smollm2, chat_ids, smol_refs, max_num_seqs, budget):
    model, tok = smollm2
    prompts, refs = chat_ids, smol_refs
    if max_num_seqs == 1:  # one request at a time: a quarter of the prompts show it
        prompts, refs = chat_ids[:8], smol_refs[:8]
    if max_num_seqs == 64:  # 64 requests at once: each prompt twice
        prompts, refs = chat_ids * 2, smol_refs * 2
    engine = LLMEngine(model, tok, num_blocks=1024, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                       enable_prefix_caching=False)
    outs = engine.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == refs
    assert engine.metrics.peak_blocks_in_use > 0
    if budget == 16:
        assert engine.metrics.steps > sum(len(p) for p in prompts) // 16


def test_greedy_equals_hf_under_preemption(smollm2, chat_ids, smol_refs):
    model, tok = smollm2
    engine = LLMEngine(model, tok, num_blocks=60, max_num_seqs=32, max_num_batched_tokens=512,
                       enable_prefix_caching=False)
    outs = engine.generate(chat_ids, GREEDY, use_tqdm=False)
    assert engine.metrics.preemptions > 0
    assert [o.token_ids for o in outs] == smol_refs


def test_tiny_architectures(tiny_model):
    name, model = tiny_model
    prompts = tiny_prompts(6, seed=11)
    refs = hf_greedy(model, prompts, 24, 0, set(), batch=6)
    small = 6 if name == "mistral" else 12  # every Mistral layer is windowed: its sequences give back blocks
    for kwargs in (dict(num_blocks=200), dict(num_blocks=200, max_num_batched_tokens=8),
                   dict(num_blocks=small, max_num_seqs=6)):
        engine = LLMEngine(model, None, enable_prefix_caching=False, **kwargs)
        outs = engine.generate(prompts, SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True),
                               use_tqdm=False)
        assert [o.token_ids for o in outs] == refs, (name, kwargs)
        if kwargs["num_blocks"] == small:
            assert engine.metrics.preemptions > 0


def test_seeded_sampling_independent_of_batch(smollm2, chat_ids):
    model, tok = smollm2
    engine = LLMEngine(model, tok, num_blocks=512)
    params = SamplingParams(max_new_tokens=20, temperature=0.9, top_p=0.9, top_k=40, seed=1234, ignore_eos=True)
    alone = engine.generate([chat_ids[0]], params, use_tqdm=False)[0].token_ids
    others = [SamplingParams(max_new_tokens=12, temperature=1.0, seed=i) for i in range(5)]
    crowd = engine.generate([chat_ids[0]] + chat_ids[1:6], [params] + others, use_tqdm=False)[0].token_ids
    assert alone == crowd
    different = engine.generate([chat_ids[0]], SamplingParams(max_new_tokens=20, temperature=0.9, seed=99,
                                                              ignore_eos=True), use_tqdm=False)[0].token_ids
    assert different != alone


def test_sampling_params_take_effect(smollm2, chat_ids):
    model, tok = smollm2
    engine = LLMEngine(model, tok, num_blocks=256)
    prompt = chat_ids[2]
    out = engine.generate([prompt], SamplingParams(max_new_tokens=30, temperature=0, min_new_tokens=30),
                          use_tqdm=False)[0]
    assert len(out.token_ids) == 30 and tok.eos_token_id not in out.token_ids[:-1]
    stop = engine.generate([prompt], SamplingParams(max_new_tokens=30, temperature=0, stop=["Rome"],
                                                    logprobs=True), use_tqdm=False)[0]
    if "Rome" in tok.decode(out.token_ids):
        assert stop.finish_reason == FinishReason.STOP and "Rome" not in stop.text
    assert len(stop.logprobs) == len(stop.token_ids) and all(lp <= 0 for lp in stop.logprobs)
    rep = engine.generate([prompt], SamplingParams(max_new_tokens=30, temperature=0, repetition_penalty=1.5),
                          use_tqdm=False)[0]
    greedy = engine.generate([prompt], SamplingParams(max_new_tokens=30, temperature=0), use_tqdm=False)[0]
    assert rep.token_ids != greedy.token_ids
    eos_only = engine.generate([prompt], SamplingParams(max_new_tokens=5, temperature=0,
                                                        stop_token_ids=[greedy.token_ids[2]]), use_tqdm=False)[0]
    assert eos_only.token_ids == greedy.token_ids[:3] and eos_only.finish_reason == FinishReason.STOP


def test_logprobs_match_hf(smollm2, chat_ids):
    model, tok = smollm2
    prompt = chat_ids[4]
    engine = LLMEngine(model, tok, num_blocks=128)
    out = engine.generate([prompt], SamplingParams(max_new_tokens=10, temperature=0, logprobs=True),
                          use_tqdm=False)[0]
    ids = torch.tensor([prompt])
    hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                        return_dict_in_generate=True, output_logits=True)
    hf_lp = [torch.log_softmax(l[0].float(), -1)[t].item() for l, t in zip(hf.logits, out.token_ids)]
    assert torch.allclose(torch.tensor(out.logprobs), torch.tensor(hf_lp), atol=1e-4)


def test_abort_frees_blocks_and_others_finish(smollm2, chat_ids):
    model, tok = smollm2
    engine = LLMEngine(model, tok, num_blocks=256)
    long = SamplingParams(max_new_tokens=200, temperature=0, ignore_eos=True)
    victim = engine.submit(chat_ids[0], long, request_id="victim")
    other = engine.submit(chat_ids[1], SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True))
    while victim.num_output_tokens < 3:
        time.sleep(0.01)
    engine.abort("victim")
    assert victim.done.wait(30) and other.done.wait(60)
    assert victim.finish_reason == FinishReason.ABORT and victim.num_output_tokens < 200
    assert other.finish_reason == FinishReason.LENGTH and other.num_output_tokens == 30
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


def test_shutdown_stops_the_thread_and_a_new_request_restarts_it(smollm2, chat_ids):
    model, tok = smollm2
    engine = LLMEngine(model, tok, num_blocks=256)
    greedy = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)
    first = engine.generate(chat_ids[:1], greedy, use_tqdm=False)
    thread = engine_thread(engine)
    assert thread is not None and thread.is_alive()
    engine.shutdown()
    assert not thread.is_alive()
    out = engine.generate(chat_ids[:1], greedy, use_tqdm=False)
    assert out[0].token_ids == first[0].token_ids and len(first[0].token_ids) == 8
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


def test_failing_request_does_not_stop_the_engine(smollm2, chat_ids):
    model, tok = smollm2
    engine = LLMEngine(model, tok, num_blocks=256)

    def broken(input_ids, scores):
        raise RuntimeError("user processor failed")

    bad = engine.submit(chat_ids[0], SamplingParams(max_new_tokens=10, temperature=0, logits_processors=broken))
    good = engine.submit(chat_ids[1], SamplingParams(max_new_tokens=10, temperature=0, ignore_eos=True))
    assert bad.done.wait(60) and good.done.wait(60)
    assert bad.finish_reason == FinishReason.ERROR and isinstance(bad.error, RuntimeError)
    assert good.finish_reason == FinishReason.LENGTH and good.num_output_tokens == 10


def test_forward_error_fails_only_that_step(smollm2, chat_ids):
    model, tok = smollm2
    engine = LLMEngine(model, tok, num_blocks=256)
    real_execute = engine.runner.execute
    calls = {"n": 0}

    def flaky(step):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated device error")
        return real_execute(step)

    engine.runner.execute = flaky
    first = engine.generate([chat_ids[0]], SamplingParams(max_new_tokens=5, temperature=0), use_tqdm=False)[0]
    assert first.finish_reason == FinishReason.ERROR
    second = engine.generate([chat_ids[1]], SamplingParams(max_new_tokens=5, temperature=0), use_tqdm=False)[0]
    assert second.finish_reason in (FinishReason.LENGTH, FinishReason.STOP) and second.token_ids
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


@pytest.mark.parametrize("prompt,params,field", [
    ([], SamplingParams(), "prompt"),
    (list(range(3, 3 + 9000)), SamplingParams(), "prompt"),
    ([5, 6, 7], SamplingParams(max_new_tokens=0), "max_new_tokens"),
    ([5, 6, 7], SamplingParams(max_new_tokens=-3), "max_new_tokens"),
    ([5, 6, 7], SamplingParams(top_p=0.0), "top_p"),
    ([5, 6, 7], SamplingParams(top_p=1.5), "top_p"),
    ([5, 6, 7], SamplingParams(temperature=-0.5), "temperature"),
    ([5, 6, 7], SamplingParams(stop=[3]), "stop"),
    ([5, 6, 7], SamplingParams(stop=b"x"), "stop"),
    ([5, 6, 7], SamplingParams(max_new_tokens=5000), "max_new_tokens"),
])
def test_bad_input_is_rejected_and_engine_keeps_serving(smollm2, chat_ids, prompt, params, field):
    model, tok = smollm2
    engine = LLMEngine(model, tok, num_blocks=64)  # 64 blocks * 16 = 1024 tokens: 5000 new tokens never fit
    running = engine.submit(chat_ids[0], SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True))
    with pytest.raises(ValueError, match=field):
        engine.submit(prompt, params)
    assert running.done.wait(60) and running.num_output_tokens == 8


def test_threads_join_the_same_batch(smollm2, chat_ids, smol_refs):
    model, tok = smollm2
    engine = LLMEngine(model, tok, num_blocks=512, enable_prefix_caching=False)
    results = [None] * 6
    barrier = threading.Barrier(6)

    def worker(i):
        barrier.wait()
        results[i] = engine.generate([chat_ids[i]], GREEDY, use_tqdm=False)[0].token_ids

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == smol_refs[:6]
    assert engine.metrics.steps < 6 * MAX_NEW  # they ran together, not one after another


def test_streaming_yields_tokens_in_order(smollm2, chat_ids, smol_refs):
    model, tok = smollm2
    engine = LLMEngine(model, tok, num_blocks=128)
    assert list(engine.stream(chat_ids[3], GREEDY)) == smol_refs[3]


def test_metrics(smollm2, chat_ids):
    model, tok = smollm2
    engine = LLMEngine(model, tok, num_blocks=256)
    engine.generate(chat_ids[:8], SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True), use_tqdm=False)
    m = engine.metrics.summary()
    assert m["finished"] == 8 and m["output_tokens"] == 128
    assert 0.5 < m["kv_slot_utilization_at_peak"] <= 1.0
    assert m["mean_ttft_s"] > 0 and m["mean_tpot_s"] > 0
    engine.generate(chat_ids[8:10], SamplingParams(max_new_tokens=4, temperature=0), use_tqdm=False)
    assert engine.metrics.summary()["prefix_cache_hit_rate"] > 0  # the chat template's system prompt is shared


def test_sampler_draws_follow_the_warped_distribution():
    """The inverse-CDF draw picks tokens at their probabilities and never one that top-k / top-p removed."""
    from hf_paged.execution.sampler import _inverse_cdf

    probs = torch.tensor([[0.1, 0.0, 0.2, 0.3, 0.4, 0.0]]).expand(100_000, 6)
    uniforms = torch.rand(100_000, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(_inverse_cdf(probs, uniforms), minlength=6).double() / 100_000
    assert counts[1] == 0 and counts[5] == 0
    assert torch.allclose(counts, probs[0].double(), atol=0.006)
    # The largest uniform below 1 must still land on a token with probability, not past the end.
    edge = _inverse_cdf(probs[:1], torch.tensor([1 - 2**-24]))
    assert edge.item() == 4
