"""Speculative decoding: greedy output equals the engine's without speculation token for token (fp32) for prompt
lookup and draft models, under continuous batching with preemption, chunked prefill and prefix caching; the
verifier's rejection rule keeps each token's distribution (statistically); the wrapped ``generate`` with
``prompt_lookup_num_tokens`` / ``assistant_model`` equals HF greedy for a batch; adaptive k, counters, metrics,
beams (no speculation), bad options, failures and aborts (no block leaks: conftest's check after every test)."""

from __future__ import annotations

import copy
import itertools
import logging

import pytest
import torch

import hf_paged
from hf_paged import LLMEngine, SamplingParams
from hf_paged.config import EngineConfig, SpeculativeConfig
from hf_paged.core.block_pool import BlockPool, BlockTable
from hf_paged.core.sequence import Sequence
from hf_paged.core.spec_decode import AGREEMENT_LOOKS, MATCH_LONGEST, SpeculationController, ngram_match
from hf_paged.engine.speculator import Speculator
from hf_paged.execution.sampler import Sampler

from conftest import build_tiny_model, left_pad, needs_cpu_kernels, tiny_prompts

NGRAM = {"method": "ngram", "num_tokens": 5}
TEXT = ("The committee met on Tuesday to review the budget for the new library. After a long discussion, the "
        "committee agreed to increase the budget for books and to reduce the budget for furniture.")
GROUNDED = [f"Repeat the following text exactly, word for word: {TEXT}",
            f"Rewrite this text, replacing 'committee' with 'board': {TEXT}",
            f"Summarise this text in one sentence: {TEXT}"]


@pytest.fixture(autouse=True)
def steady_clock(monkeypatch):
    """Every engine step takes one tick of the speculator's clock, drafts or not: adaptive k's decisions do not depend
    on this machine's timing (drafts then always pay)."""
    ticks = itertools.count()
    monkeypatch.setattr(Speculator, "clock", staticmethod(lambda: next(ticks)))


def _chat(tok, text):
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _outputs(model, tok, prompts, params, **options):
    with LLMEngine(model, tok, **options) as engine:
        outs = engine.generate(prompts, params, use_tqdm=False)
        return outs, engine.stats()


@pytest.fixture(scope="module")
def grounded_ids(smollm2, chat_ids):
    _, tok = smollm2
    return [_chat(tok, t) for t in GROUNDED] + chat_ids[:5]


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dir):
    return build_tiny_model("llama", tiny_model_dir)


def _perturbed(model, scale, seed=0):
    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().clamp_min(1e-3))
    return draft


def _repetitive(n, seed=0):
    """Prompts that repeat themselves (prompt lookup finds drafts in them)."""
    return [p + p[:7] + p for p in tiny_prompts(n, seed=seed, low=6, high=24)]


# ---- greedy equality in the engine ----------------------------------------------------------------------------
@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "always-k"])
def test_ngram_greedy_equals_plain_under_preemption_and_prefix_caching(smollm2, grounded_ids, adaptive):
    model, tok = smollm2
    params = SamplingParams(max_new_tokens=40, temperature=0)
    # A pool for about half the batch: requests are preempted and recomputed; the chat template's system prompt is
    # a cached prefix; a small token budget chunks the prefills and trims drafts.
    options = dict(num_blocks=40, block_size=8, max_num_batched_tokens=96, enable_prefix_caching=True)
    plain, _ = _outputs(model, tok, grounded_ids, params, **options)
    spec, stats = _outputs(model, tok, grounded_ids, params, speculative={**NGRAM, "adaptive": adaptive}, **options)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert [o.text for o in spec] == [o.text for o in plain]
    assert stats["preemptions"] > 0 and stats["prefix_cache_hits"] > 0
    assert stats["spec_decode_num_accepted_tokens"] > 20
    assert 0 < stats["spec_decode_num_accepted_tokens"] <= stats["spec_decode_num_draft_tokens"]
    assert stats["spec_decode_num_accepted_tokens_per_pos_0"] >= stats["spec_decode_num_accepted_tokens_per_pos_1"]
    assert spec[0].metrics["spec_decode_num_accepted_tokens"] > 0  # the request's own counters


@pytest.mark.parametrize("draft", ["itself", "perturbed"])
def test_draft_model_greedy_equals_plain(tiny_llama, draft):
    target = tiny_llama
    drafter = target if draft == "itself" else _perturbed(target, 0.05)
    prompts = _repetitive(10, seed=1)
    params = SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True)
    options = dict(num_blocks=48, block_size=4, max_num_batched_tokens=64)
    plain, _ = _outputs(target, None, prompts, params, **options)
    spec, stats = _outputs(target, None, prompts, params, **options,
                           speculative={"method": "draft", "num_tokens": 4, "draft_model": drafter, "adaptive": False})
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert stats["preemptions"] > 0
    if draft == "itself":  # a model drafting for itself is always right
        assert stats["spec_decode_num_accepted_tokens"] == stats["spec_decode_num_draft_tokens"] > 0
    else:
        assert 0 < stats["spec_decode_num_accepted_tokens"] < stats["spec_decode_num_draft_tokens"]


def test_sleep_frees_the_draft_model_too(tiny_llama):
    """``sleep()`` frees the draft model's KV and packed weights with the target's; a draft trained meanwhile drafts
    with its new weights after waking (a draft now equal to the target: every drafted token accepted)."""
    target = tiny_llama
    drafter = _perturbed(target, 0.05)
    prompts = _repetitive(4, seed=3)
    params = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
    spec = {"method": "draft", "num_tokens": 4, "draft_model": drafter, "adaptive": False}
    with LLMEngine(target, None, num_blocks=64, speculative=spec) as engine:
        first = engine.generate(prompts, params, use_tqdm=False)
        draft_runner = next(iter(engine.speculator.drafters.values())).runner
        assert draft_runner.kv_cache.kv.numel() > 0
        engine.sleep()
        assert draft_runner.kv_cache.kv.numel() == 0 and not draft_runner.forwards
        drafter.load_state_dict(target.state_dict())
        before = engine.stats()
        again = engine.generate(prompts, params, use_tqdm=False)  # wakes up
        after = engine.stats()
    assert draft_runner.kv_cache.kv.numel() == 0  # closed
    assert [o.token_ids for o in again] == [o.token_ids for o in first]
    drafted = after["spec_decode_num_draft_tokens"] - before["spec_decode_num_draft_tokens"]
    assert after["spec_decode_num_accepted_tokens"] - before["spec_decode_num_accepted_tokens"] == drafted > 0


def test_draft_model_on_smollm2_equals_plain(smollm2, grounded_ids):
    model, tok = smollm2
    prompts = grounded_ids[:4]
    params = SamplingParams(max_new_tokens=24, temperature=0)
    plain, _ = _outputs(model, tok, prompts, params, num_blocks=256)
    spec, stats = _outputs(model, tok, prompts, params, num_blocks=256,
                           speculative={"method": "draft", "num_tokens": 3, "draft_model": _perturbed(model, 0.02)})
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert stats["spec_decode_num_accepted_tokens"] > 0


def test_stops_logprobs_and_min_tokens_are_those_without_speculation(tiny_llama):
    """Each accepted token goes through the same checks: stop tokens (not before min_new_tokens), max_new_tokens, a
    stop check; logprobs are those of the model at each position."""
    prompts = _repetitive(8, seed=2)
    plain_outs, _ = _outputs(tiny_llama, None, prompts, SamplingParams(max_new_tokens=30, temperature=0,
                                                                       ignore_eos=True), num_blocks=256)
    stop_ids = sorted({o.token_ids[5] for o in plain_outs[:4]})  # tokens that do come up, mid-draft
    seen = []

    def stop_check(ids):
        seen.append(len(ids))
        return len(ids) >= 17

    for params in (SamplingParams(max_new_tokens=30, temperature=0, stop_token_ids=stop_ids, ignore_eos=True,
                                  min_new_tokens=3, logprobs=True, top_logprobs=2),
                   SamplingParams(max_new_tokens=23, temperature=0, ignore_eos=True, stop_check=stop_check)):
        plain, _ = _outputs(tiny_llama, None, prompts, params, num_blocks=256)
        calls = len(seen)
        spec, stats = _outputs(tiny_llama, None, prompts, params, num_blocks=256,
                               speculative={**NGRAM, "adaptive": False})
        assert stats["spec_decode_num_accepted_tokens"] > 0
        for a, b in zip(plain, spec):
            assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
            if params.logprobs:
                assert b.logprobs == pytest.approx(a.logprobs, abs=1e-4)
                assert [[t for t, _ in row] for row in b.top_logprobs] == [[t for t, _ in row] for row in a.top_logprobs]
        if params.stop_check is not None:  # called after every token, as without speculation
            assert sorted(seen[calls:]) == sorted(seen[:calls])


def test_beams_do_not_speculate(tiny_llama):
    prompts = _repetitive(2, seed=3)
    beams = SamplingParams(max_new_tokens=12, temperature=0, num_beams=3, num_return_sequences=2)
    plain, _ = _outputs(tiny_llama, None, prompts, beams, num_blocks=256)
    spec, stats = _outputs(tiny_llama, None, prompts, beams, num_blocks=256, speculative=NGRAM)
    assert [[s.token_ids for s in o.samples] for o in spec] == [[s.token_ids for s in o.samples] for o in plain]
    assert stats["spec_decode_num_drafts"] == 0
    with pytest.raises(ValueError, match="^speculative: beam search"):
        SamplingParams(num_beams=2, temperature=0, speculative=NGRAM).validate()


def test_parallel_samples_speculate_on_their_own_blocks(tiny_llama):
    """n > 1: the samples share the prompt's blocks; each one's draft writes only past a copied last block."""
    prompts = _repetitive(3, seed=4)
    params = SamplingParams(max_new_tokens=20, temperature=0.8, n=3, seed=7, ignore_eos=True)
    outs, stats = _outputs(tiny_llama, None, prompts, params, num_blocks=64, block_size=4,
                           speculative={**NGRAM, "adaptive": False})
    assert all(len(s.token_ids) == 20 for o in outs for s in o.samples)
    assert stats["spec_decode_num_drafts"] > 0
    greedy = SamplingParams(max_new_tokens=20, temperature=0, n=2, ignore_eos=True)
    plain, _ = _outputs(tiny_llama, None, prompts, greedy, num_blocks=64, block_size=4)
    spec, _ = _outputs(tiny_llama, None, prompts, greedy, num_blocks=64, block_size=4, speculative=NGRAM)
    assert [[s.token_ids for s in o.samples] for o in spec] == [[s.token_ids for s in o.samples] for o in plain]


def test_requests_choose_their_own_speculation(tiny_llama):
    prompts = _repetitive(4, seed=5)
    base = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)
    with LLMEngine(tiny_llama, None, num_blocks=256) as engine:
        assert engine.speculator is None  # nothing built until a request asks
        plain = engine.generate(prompts, base, use_tqdm=False)
        own = copy.copy(base)
        own.speculative = {"method": "ngram", "num_tokens": 3, "adaptive": False}
        spec = engine.generate(prompts, own, use_tqdm=False)
        assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
        assert engine.stats()["spec_decode_num_drafts"] > 0
    penalised = SamplingParams(max_new_tokens=10, temperature=0, repetition_penalty=1.3)
    with LLMEngine(tiny_llama, None, num_blocks=256, speculative=NGRAM) as engine:
        engine.generate(prompts, penalised, use_tqdm=False)  # its logits depend on its drafts: no speculation
        assert engine.stats()["spec_decode_num_drafts"] == 0


# ---- failures, aborts, bad input ------------------------------------------------------------------------------
def test_a_failing_drafter_leaves_requests_decoding(tiny_llama, monkeypatch, caplog):
    from hf_paged.execution.draft_model import DraftModelDrafter

    def broken(self, seqs, ks):
        raise RuntimeError("draft model on fire")

    prompts = _repetitive(3, seed=6)
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    plain, _ = _outputs(tiny_llama, None, prompts, params, num_blocks=128)
    monkeypatch.setattr(DraftModelDrafter, "propose", broken)
    with caplog.at_level(logging.ERROR):
        spec, stats = _outputs(tiny_llama, None, prompts, params, num_blocks=128,
                               speculative={"method": "draft", "draft_model": tiny_llama})
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert "drafting failed" in caplog.text and stats["spec_decode_num_drafts"] == 0


def test_abort_while_speculating_frees_every_block(tiny_llama):
    draft = _perturbed(tiny_llama, 0.01)
    with LLMEngine(tiny_llama, None, num_blocks=128, speculative={"method": "draft", "num_tokens": 4,
                                                                  "draft_model": draft, "adaptive": False}) as engine:
        seqs = [engine.submit(p, SamplingParams(max_new_tokens=200, ignore_eos=True, temperature=0))
                for p in _repetitive(4, seed=7)]
        while engine.stats()["spec_decode_num_drafts"] < 4:
            seqs[0].done.wait(0.01)
        for seq in seqs:
            engine.abort(seq.request_id)
        for seq in seqs:
            seq.done.wait()
        drafter = next(iter(engine.speculator.drafters.values()))
        assert engine.pool.num_free_blocks == engine.pool.num_blocks
        assert drafter.pool.num_free_blocks == drafter.pool.num_blocks


@pytest.mark.parametrize("bad, field", [({"method": "eagle"}, "speculative.method"),
                                        ({"num_tokens": -1}, "speculative.num_tokens"),
                                        ({"num_tokens": "4"}, "speculative.num_tokens"),
                                        ({"prompt_lookup_min": 4, "prompt_lookup_max": 2},
                                         "speculative.prompt_lookup_min"),
                                        ({"method": "draft"}, "speculative.draft_model"),
                                        ({"draft_model": object()}, "speculative.draft_model"),
                                        ({"k": 3}, "speculative.k"), ({"adaptive": 1}, "speculative.adaptive")])
def test_bad_speculative_options_name_the_field(bad, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        EngineConfig(speculative=bad)
    with pytest.raises(ValueError, match=f"^{field}:"):
        SamplingParams(speculative=bad).validate()
    with pytest.raises(ValueError, match="^speculative: must be a dict"):
        EngineConfig(speculative="ngram")


def test_a_draft_model_the_engine_cannot_run_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="^speculative.draft_model: must be a causal LM"):
        LLMEngine(tiny_llama, None, num_blocks=16, speculative={"method": "draft", "draft_model": "a/path"})


# ---- the HF surface -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["prompt_lookup", "assistant"])
def test_wrapped_generate_assisted_equals_hf_greedy_for_a_batch(tiny_model_dir, tiny_llama, how):
    model = build_tiny_model("llama", tiny_model_dir)
    prompts = _repetitive(3, seed=8)
    ids, mask = left_pad(prompts, 0)
    want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    extra = {"prompt_lookup_num_tokens": 4} if how == "prompt_lookup" else {"assistant_model": _perturbed(model, 0.01)}
    hf_paged.wrap(model, num_blocks=128)
    try:
        got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, **extra)
        stats = hf_paged.get_engine(model).stats()
        assert hf_paged.fallback_reason(model) is None
    finally:
        hf_paged.unwrap(model)
    assert torch.equal(got, want)
    assert stats["spec_decode_num_accepted_tokens"] > 0


@pytest.mark.parametrize("how", ["prompt_lookup", "assistant"])
def test_wrapped_beam_search_ignores_assisted_options_as_hf_does(tiny_model_dir, how, caplog):
    """HF's beam search ignores ``prompt_lookup_num_tokens`` / ``assistant_model`` (with a warning): so does the
    wrapped ``generate``, on the engine, with HF's beams."""
    model = build_tiny_model("llama", tiny_model_dir)
    ids, mask = left_pad(_repetitive(2, seed=3), 0)
    extra = {"prompt_lookup_num_tokens": 4} if how == "prompt_lookup" else {"assistant_model": _perturbed(model, 0.01)}
    beams = dict(max_new_tokens=8, do_sample=False, num_beams=3, num_return_sequences=2)
    want = model.generate(input_ids=ids, attention_mask=mask, **beams, **extra)
    hf_paged.wrap(model, num_blocks=128)
    try:
        with caplog.at_level(logging.WARNING, logger="hf_paged"):
            got = model.generate(input_ids=ids, attention_mask=mask, **beams, **extra)
        assert hf_paged.fallback_reason(model) is None
        assert hf_paged.get_engine(model).stats().get("spec_decode_num_drafts", 0) == 0
    finally:
        hf_paged.unwrap(model)
    assert torch.equal(got, want)
    assert any("beam search does not speculate" in r.message for r in caplog.records)


def test_assisted_options_the_engine_hands_to_hf_run_as_hf_runs_them(tiny_model_dir):
    """A call the engine does not take (here ``output_logits``) with ``prompt_lookup_num_tokens`` goes to HF's own
    assisted ``generate``, on a ``PagedCache`` (which crops its rejected candidates as HF's caches do)."""
    model = build_tiny_model("llama", tiny_model_dir)
    ids = torch.tensor(_repetitive(1, seed=4))
    call = dict(max_new_tokens=8, do_sample=False, prompt_lookup_num_tokens=4, output_logits=True,
                return_dict_in_generate=True)
    want = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **call)
    hf_paged.wrap(model, num_blocks=64)
    try:
        got = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **call)
    finally:
        hf_paged.unwrap(model)
    assert torch.equal(got.sequences, want.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, want.logits))


def test_prompt_lookup_on_smollm2_equals_hf(smollm2, grounded_ids):
    model, tok = smollm2
    rows = grounded_ids[:2]
    ids, mask = left_pad(rows, tok.pad_token_id)
    want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    wrapped = copy.copy(model)  # the session's model stays unwrapped
    hf_paged.wrap(wrapped, tok, num_blocks=256)
    try:
        got = wrapped.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                               prompt_lookup_num_tokens=6)
    finally:
        hf_paged.unwrap(wrapped)
    assert torch.equal(got, want)


# ---- pieces ---------------------------------------------------------------------------------------------------
def test_ngram_match_measures_how_far_back_the_match_runs():
    assert ngram_match([1, 2, 3, 9, 1, 2, 4, 7, 1, 2], 3, 1, 3)[:2] == ([4, 7, 1], 2)
    #                 the earlier "5 6 7 8" agrees four tokens back, beyond max_n
    assert ngram_match([5, 6, 7, 8, 0, 3, 5, 6, 7, 8], 2, 1, 2)[:2] == ([0, 3], 4)
    tokens = list(range(50)) + list(range(45))  # a copy 45 tokens long: measured up to MATCH_LONGEST
    assert ngram_match(tokens, 4, 1, 3) == ([45, 46, 47, 48], MATCH_LONGEST, True)
    assert ngram_match([1, 2, 3], 4, 1, 3) == ([], 0, False)


def test_ngram_match_says_whether_every_occurrence_was_followed_alike():
    assert ngram_match([1, 2, 3, 9, 1, 2, 4, 7, 1, 2], 3, 1, 3)[2] is False  # "1 2" was followed by 3, then 4
    assert ngram_match([1, 2, 4, 9, 1, 2, 4, 7, 1, 2], 3, 1, 3)[2] is True  # by 4 both times
    assert ngram_match([7, 1, 2, 4, 1, 2], 2, 1, 3)[2] is True  # one occurrence: nothing disagrees
    # Only the matched n tokens count: "3 1 2" occurs once (agreed), though "1 2" alone was followed by 5 too.
    assert ngram_match([1, 2, 5, 3, 1, 2, 4, 3, 1, 2], 2, 1, 3) == ([4, 3], 3, True)
    # Bytes that spell "1 2" across other ids (256 and 512, little-endian) are no occurrence to disagree.
    assert ngram_match([256, 512, 0, 9, 1, 2, 4, 1, 2], 1, 1, 2) == ([4], 2, True)
    # Past AGREEMENT_LOOKS occurrences that agree, the rest are not read.
    agreeing = [5, 6] * (AGREEMENT_LOOKS + 1)
    assert ngram_match([5, 7] + agreeing + [5], 1, 1, 1)[::2] == ([6], True)
    assert ngram_match([5, 7] + agreeing[:4] + [5], 1, 1, 1)[::2] == ([6], False)


def ngram_draft(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    return ngram_match(tokens, k, min_n, max_n)[0]


def test_ngram_draft_takes_the_latest_longest_match():
    assert ngram_draft([1, 2, 3, 9, 1, 2, 4, 7, 1, 2], 3, 1, 3) == [4, 7, 1]  # latest "1 2"
    assert ngram_draft([5, 1, 2, 3, 8, 8, 0, 2, 3, 6, 1, 2, 3], 2, 1, 3) == [8, 8]  # "1 2 3" beats the later "2 3"
    assert ngram_draft([1, 2, 3, 4], 3, 1, 3) == []
    assert ngram_draft([7, 7], 4, 1, 3) == [7]  # the continuation may run into the suffix itself
    assert ngram_draft([1, 2, 1], 5, 2, 3) == []  # below prompt_lookup_min
    # Byte patterns that straddle token ids are no match: 256 = 00 01 00 00, 1 = 01 00 00 00.
    assert ngram_draft([256, 0, 9, 1, 0], 2, 2, 2) == []
    assert ngram_draft([70000, 3, 70000], 1, 1, 1) == [3]


def test_controller_speculates_while_steps_with_drafts_beat_plain_steps(caplog):
    c = SpeculationController()
    seqs = [Sequence([1], SamplingParams(), BlockTable(BlockPool(1))) for _ in range(32)]
    for s in seqs:
        s.spec_hits, s.spec_trials = [80.0, 80.0], [100.0, 100.0]  # accepted 4 times in 5
    assert c.plan(seqs[:1], [8], 1, [True]) == [0]  # the first decode step: without drafts
    assert c.plan(seqs[:1], [8], 1, [False]) == [8]  # not adaptive: always the cap
    c.record_step(1, 1, 0.010, 0)
    assert c.plan(seqs[:1], [8], 1, [True]) == [1]  # then, nothing measured with drafts, a token
    c.record_step(1, 1, 0.0105, 1)  # that first step says no (the token was rejected): no decision yet
    with caplog.at_level(logging.INFO, logger="hf_paged.core.spec_decode"):
        for _ in range(SpeculationController.FIRST_STEPS - 1):
            assert c.plan(seqs[:1], [8], 1, [True]) == [8]
            assert c.last_plan["on"] == 1.0
            c.record_step(1, 7, 0.011, 8)  # 7 tokens for 10 % more time than a plain step's one
        assert "speculation" not in caplog.text
        assert c.plan(seqs[:1], [8], 1, [True]) == [8]
        assert c.last_plan["on"] == 1.0 and c.last_plan["draft_cost_s"] == pytest.approx(0.001 / 8, rel=0.3)
        assert c.plain_time(1) == pytest.approx(0.010)
        seqs[0].spec_hits = [0.0, 80.0]  # a first token near never accepted: no draft, though on
        assert c.plan(seqs[:1], [8], 1, [True]) == [0]
        for s in seqs:
            s.spec_hits = [80.0, 80.0]
        # Batch 32, a new batch size: its first step with drafts is planned with batch 1's cost of a drafted token.
        c.record_step(32, 32, 0.050, 0)
        assert c.plan(seqs, [4] * 32, 32, [True] * 32) == [4] * 32
        for _ in range(SpeculationController.FIRST_STEPS):  # 40 tokens in 80 ms, where plain steps take 50 ms for 32
            c.record_step(32, 40, 0.080, 64)
        plans = [c.plan(seqs, [4] * 32, 32, [True] * 32) for _ in range(SpeculationController.PROBE)]
    # Off, and one probe: a token a request, the cheapest try.
    assert plans.count([0] * 32) == SpeculationController.PROBE - 1 and plans[-1] == [1] * 32
    # While the decision holds, probes come half as often each time, down to one in PROBE_MAX steps.
    probes = [i for i in range(16 * SpeculationController.PROBE)
              if c.plan(seqs, [4] * 32, 32, [True] * 32) != [0] * 32]
    assert [b - a for a, b in zip(probes, probes[1:])] == [64, 128]
    assert probes[0] == 32 - 1
    assert "speculation on at batch 1" in caplog.text and "speculation off at batch 32" in caplog.text
    # Cheap verification at batch 32: positions go to the likeliest drafts first, while they pay.
    c.record_step(32, 96, 0.051, 128)
    c.record_step(32, 96, 0.051, 128)
    seqs[0].spec_hits = [20.0, 20.0]  # accepted 1 time in 5
    ks = c.plan(seqs, [4] * 32, 32, [True] * 32)
    assert c.last_plan["on"] == 1.0 and ks[1:] == [4] * 31 and ks[0] < 4
    assert c.plain_time(32) == pytest.approx(0.050) and c.plain_time(16) > c.plain_time(1)
    assert c.bucket(5) == 5 and c.bucket(20) == 32 and c.bucket(32) == 32
    c.forget(seqs[:1])
    assert seqs[0].spec_trials == pytest.approx([90.0, 90.0])
    c.record_verified(seqs[0], 4, 2)  # first accepted, second accepted, third rejected
    assert seqs[0].spec_hits == pytest.approx([19.0, 19.0]) and seqs[0].spec_trials == pytest.approx([91.0, 92.0])


def test_controller_stops_only_past_a_margin_and_resumes_once_drafts_win():
    """Speculating, a batch size stops once its steps with drafts take MARGIN times what plain steps would (the
    measurement's noise must not switch it off where it pays on average); off, it resumes once they take less."""
    c = SpeculationController()
    seq = Sequence([1], SamplingParams(), BlockTable(BlockPool(1)))
    seq.spec_hits, seq.spec_trials = [80.0, 80.0], [100.0, 100.0]
    c.record_step(4, 4, 0.040, 0)  # plain steps: 40 ms for 4 tokens

    def decisions(seconds: float, tokens: int, steps: int) -> list[float]:
        out = []
        for _ in range(steps):
            c.plan([seq], [8], 4, [True])
            out.append(c.last_plan["on"])
            c.record_step(4, tokens, seconds, 8)
        return out

    assert decisions(0.041, 4, SpeculationController.FIRST_STEPS + 8)[-8:] == [1.0] * 8  # 2.5 % slower: still on
    assert decisions(0.048, 4, 12)[-1] == 0.0  # 20 % slower: off
    c._since_probe[4] = -10 ** 6  # no probes in what follows: steps with drafts are fed in directly
    for _ in range(20):  # as slow as plain steps: stays off
        c.record_step(4, 4, 0.040, 8)
    c.plan([seq], [8], 4, [True])
    assert c.last_plan["on"] == 0.0
    for _ in range(20):  # faster than plain steps: on again
        c.record_step(4, 5, 0.040, 8)
    c.plan([seq], [8], 4, [True])
    assert c.last_plan["on"] == 1.0


def test_controller_rates_prompt_lookup_drafts_by_their_match_length():
    """A long match (a span being copied) earns long drafts and a one-token match none, in the same request; the
    rates come from every request's verified drafts of that match length."""
    c = SpeculationController()
    c.record_step(1, 1, 0.010, 0)
    for _ in range(SpeculationController.FIRST_STEPS):
        c.record_step(1, 5, 0.020, 8)  # a drafted token costs an eighth of a plain step
    seqs = [Sequence([1], SamplingParams(), BlockTable(BlockPool(1))) for _ in range(2)]
    assert c.match_class(1) == 1 and c.match_class(5) == 4 and c.match_class(9) == 5 and c.match_class(40) == 7
    for _ in range(30):
        seqs[0].spec_match = 20  # copying: 8 of 8 accepted
        c.record_verified(seqs[0], 8, 8)
        seqs[1].spec_match = 1  # a one-token match: rejected at once
        c.record_verified(seqs[1], 8, 0)
    assert c.alpha(seqs[0])[0] > 0.9 and c.alpha(seqs[1])[0] < 0.1
    fresh = Sequence([1], SamplingParams(), BlockTable(BlockPool(1)))  # no history of its own
    fresh.spec_match = 17
    assert c.plan([fresh], [8], 1, [True]) == [8]
    fresh.spec_match = 1
    assert c.plan([fresh], [8], 1, [True]) == [0]
    fresh.spec_match = 3  # a class never seen: the prior of one in two, still worth a few tokens here
    assert 0 < c.plan([fresh], [8], 1, [True])[0] < 8


def _seq(params, draft, q=None):
    seq = Sequence([1, 2, 3], params, BlockTable(BlockPool(1)))
    seq.spec_token_ids, seq.spec_probs = list(draft), q
    return seq


def test_verify_greedy_accepts_the_matching_prefix_then_corrects():
    logits = torch.full((8, 6), -5.0)
    logits[[0, 1, 2, 3], [4, 2, 5, 1]] = 5.0  # argmax per row: 4, 2, 5, 1
    logits[[4, 5, 6, 7], [3, 3, 0, 0]] = 5.0
    greedy = SamplingParams(temperature=0, min_new_tokens=0)
    seqs = [_seq(greedy, [4, 2, 0]), _seq(greedy, [3, 3, 0])]
    out = Sampler().verify(logits, seqs)
    assert [o[0] for o in out] == [[4, 2, 5], [3, 3, 0, 0]]
    seqs = [_seq(greedy, [1]), _seq(greedy, [5, 1, 3]), _seq(greedy, [0])]  # drafts of different lengths
    assert [o[0] for o in Sampler(c_argmax=False).verify(logits, seqs)] == [[4], [5, 1, 3, 3], [0, 0]]
    banned = SamplingParams(temperature=0, min_new_tokens=2, stop_token_ids=[3])  # 3 banned for two tokens
    seq = _seq(banned, [3, 3, 0])
    logits[4, 2] = 4.0
    assert Sampler().verify(logits[4:], [seq])[0][0] == [2]


@pytest.mark.parametrize("drafts", ["one-hot", "distribution"])
def test_rejection_sampling_keeps_the_target_distribution(drafts):
    """Each emitted token is distributed as the target's warped distribution p, whatever the draft proposes: the
    first token's frequencies match p at its position, the second's (after an accepted first) p at the next."""
    torch.manual_seed(0)
    n, vocab = 6000, 5
    p_logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0], [0.0, 1.5, -0.5, 1.0, 0.2], [0.3, 0.1, 0.0, 0.0, 2.0]])
    params = SamplingParams(temperature=0.9, top_k=4)
    p = torch.stack([torch.softmax(row / 0.9, -1) for row in p_logits])
    p[0, 3] = 0  # top-k 4 drops the least likely token of each row
    p[1, 2] = 0
    p[2, 3] = 0  # ties: the last of the equal ones goes
    p = p / p.sum(-1, keepdim=True)
    q = torch.tensor([[0.1, 0.1, 0.6, 0.1, 0.1], [0.5, 0.1, 0.1, 0.2, 0.1]])
    seqs = []
    for _ in range(n):
        if drafts == "one-hot":
            seqs.append(_seq(params, [2, 1]))
        else:
            x = torch.multinomial(q, 1).flatten().tolist()
            seqs.append(_seq(params, x, q))
    out = Sampler().verify(p_logits.repeat(n, 1), seqs)
    first = torch.bincount(torch.tensor([o[0][0] for o in out]), minlength=vocab).double() / n
    assert torch.allclose(first, p[0].double(), atol=0.025), (first, p[0])
    accepted = [o[0] for o, s in zip(out, seqs) if o[0][0] == s.spec_token_ids[0] and len(o[0]) > 1]
    second = torch.bincount(torch.tensor([t[1] for t in accepted]), minlength=vocab).double() / len(accepted)
    assert torch.allclose(second, p[1].double(), atol=0.035), (second, p[1])
    assert first[3] == 0


def test_truncate_gives_back_whole_blocks_and_refuses_cached_ones():
    pool = BlockPool(8, 4)
    table = BlockTable(pool)
    table.append_slots(5)
    fork = table.fork()
    table.append_slots(6)  # copy-on-write of the shared block, then fresh blocks
    assert len(table.blocks) == 3 and pool.num_free_blocks == 4
    table.truncate(6)
    assert len(table.blocks) == 2 and table.num_tokens == 6 and pool.num_free_blocks == 5
    assert fork.blocks[0] == table.blocks[0] and fork.num_tokens == 5  # shared blocks untouched
    table.truncate(8)  # longer than it is: nothing
    assert table.num_tokens == 6
    pool.register_full_block(table.blocks[0], b"h" * 16)
    with pytest.raises(RuntimeError, match="prefix cache"):
        table.truncate(3)
    table.free()
    fork.free()
    assert pool.num_free_blocks == 8


def test_prometheus_has_vllm_spec_decode_counters():
    from hf_paged.serve.metrics import ServerMetrics

    stats = {"running": 0, "waiting": 0, "kv_cache_usage": 0.0, "num_blocks": 1, "num_free_blocks": 1,
             "prefix_cache_queries": 0, "prefix_cache_hits": 0, "preemptions": 0, "prompt_tokens": 3,
             "generation_tokens": 9, "spec_decode_num_drafts": 2, "spec_decode_num_draft_tokens": 8,
             "spec_decode_num_accepted_tokens": 5, "spec_decode_num_accepted_tokens_per_pos_0": 2,
             "spec_decode_num_accepted_tokens_per_pos_1": 2, "spec_decode_num_accepted_tokens_per_pos_2": 1}
    text = ServerMetrics(lambda: stats, "m", 128).render().decode()
    assert 'hf_paged:spec_decode_num_drafts_total{engine="0",model_name="m"} 2.0' in text
    assert 'hf_paged:spec_decode_num_draft_tokens_total{engine="0",model_name="m"} 8.0' in text
    assert 'hf_paged:spec_decode_num_accepted_tokens_total{engine="0",model_name="m"} 5.0' in text
    assert 'hf_paged:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="2"} 1.0' in text


def test_speculative_config_round_trips():
    config = SpeculativeConfig.of({"method": "ngram", "num_tokens": 3})
    assert config == SpeculativeConfig("ngram", 3) and SpeculativeConfig.of(config) is config
    assert EngineConfig.from_options({"speculative": {"num_tokens": 2}}).speculative.num_tokens == 2


def test_seeded_sampling_with_speculation_does_not_depend_on_the_batch(tiny_llama):
    """A seeded request drafts its cap whatever the controller would choose for the batch: its draws depend on its
    own tokens only."""
    prompts = _repetitive(5, seed=9)
    params = SamplingParams(max_new_tokens=24, temperature=0.7, seed=11, ignore_eos=True)
    alone, _ = _outputs(tiny_llama, None, prompts[:1], params, num_blocks=256, speculative=NGRAM)
    crowd, stats = _outputs(tiny_llama, None, prompts, params, num_blocks=256, speculative=NGRAM)
    assert alone[0].token_ids == crowd[0].token_ids
    assert stats["spec_decode_num_drafts"] > 0


def test_a_verified_draft_is_attended_as_decode_rows_or_as_one_chunk():
    """Each of a drafted sequence's 1 + k tokens is a one-token attention row with its own causal length (the step
    stays decode-only for the kernels: what CUDA graphs replay), or, where the runner verifies drafts as chunks (the C
    kernels), the 1 + k tokens are one causal chunk after the step's decodes, read with their K/V once."""
    from types import SimpleNamespace
    from hf_paged.core.scheduler import ScheduledSequence, SchedulerOutput
    from hf_paged.execution.step_inputs import build_step_inputs
    kv = SimpleNamespace(block_size=4, device=torch.device("cpu"), null_block=0)
    step = SchedulerOutput([ScheduledSequence("b", [3, 8, 9], 6, [3, 4, 5], True, num_draft=2),
                            ScheduledSequence("a", [7], 5, [1, 2], True),
                            ScheduledSequence("c", [1, 2], 0, [6], True)])
    inputs = build_step_inputs(step, kv, None, None)
    meta = inputs.meta
    assert meta.num_decodes == 4 and meta.q_lens_list == [1, 1, 1, 1, 2] and meta.kv_lens_list == [7, 8, 9, 6, 2]
    assert meta.cu_seqlens_q.tolist() == [0, 1, 2, 3, 4, 6] and meta.block_tables[0:3].tolist() == [[3, 4, 5]] * 3
    assert inputs.positions.tolist() == [[6, 7, 8, 5, 0, 1]] and inputs.sample_rows == [0, 0, 0, 1, 2]

    inputs = build_step_inputs(step, kv, None, None, drafts_as_chunks=True)
    meta = inputs.meta  # the decode first, then the draft's chunk and the prompt's, each causal over its own tokens
    assert meta.num_decodes == 1 and meta.q_lens_list == [1, 3, 2] and meta.kv_lens_list == [6, 9, 2]
    assert meta.cu_seqlens_q.tolist() == [0, 1, 4, 6] and meta.block_tables[1].tolist() == [3, 4, 5]
    assert inputs.input_ids.tolist() == [[7, 3, 8, 9, 1, 2]] and inputs.positions.tolist() == [[5, 6, 7, 8, 0, 1]]
    assert meta.slot_mapping.tolist() == [9, 18, 19, 20, 24, 25]
    # the kept logits: the decode's, the draft's three (verified at each position), the prompt's last
    assert inputs.sample_rows == [1, 0, 0, 0, 2] and inputs.logits_rows.tolist() == [0, 1, 2, 3, 5]


@needs_cpu_kernels
def test_drafts_verified_as_chunks_run_the_one_call_layers(monkeypatch):
    """On the C kernels a drafted sequence is verified as one chunk through the one-call decoder layers (decode
    kernel for the undrafted rows, prefill kernel for the chunks: heads 64 wide, which it takes), with the greedy
    output of plain decoding."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from hf_paged.execution.patches import fused_layers
    torch.manual_seed(5)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                                         bos_token_id=1, eos_token_id=2)).eval()
    layer_class = fused_layers._FusedDecoderLayer
    one_call, chunked = layer_class._decode_in_one_call, []

    def spy(self, hidden_states, position_embeddings, meta):
        out = one_call(self, hidden_states, position_embeddings, meta)
        d = meta.num_decodes  # a chunk after a cached prefix: a draft (the prompts are prefilled whole)
        if out is not None and any(kv > q for q, kv in zip(meta.q_lens_list[d:], meta.kv_lens_list[d:])):
            chunked.append(meta.q_lens_list)
        return out

    monkeypatch.setattr(layer_class, "_decode_in_one_call", spy)
    prompts = _repetitive(6, seed=21)
    params = SamplingParams(max_new_tokens=32, temperature=0, ignore_eos=True)
    plain, _ = _outputs(model, None, prompts, params, num_blocks=256)
    spec, stats = _outputs(model, None, prompts, params, num_blocks=256, speculative=NGRAM)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert stats["spec_decode_num_accepted_tokens"] > 0
    assert chunked  # drafts went through the one-call layers as chunks
