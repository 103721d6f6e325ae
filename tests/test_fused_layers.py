"""The fused CPU forwards of Llama-style layers (``patches/fused_layers.py``) and their C kernels
(``kernels/cpu_fused_ops.py``): the kernels against transformers' own modules, which modules each architecture
gets fused, HF's greedy tokens through fused engines, call-scoping, re-packing after a weight change, and the
kernel switch."""

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama import modeling_llama

from hf_paged import LLMEngine, SamplingParams
from hf_paged.execution.kernels import cpu_fused_ops, cpu_library
from hf_paged.execution.patches import fused_layers
from hf_paged.execution.patches.linear import AMX_MAX_ROWS, SMALL_MAX_ROWS, AmxWeight, SmallRowsWeight, amx_available, \
    small_rows_available

from conftest import build_tiny_model, needs_cpu_kernels, tiny_prompts
from test_engine import hf_greedy

needs_kernel = needs_cpu_kernels
GREEDY16 = SamplingParams(max_new_tokens=16, temperature=0, ignore_eos=True)
DTYPES = [torch.float32, torch.bfloat16]


def _hf_norm(weight: torch.Tensor, eps: float) -> torch.nn.Module:
    norm = modeling_llama.LlamaRMSNorm(weight.shape[0], eps=eps).to(weight.dtype)
    norm.weight.data.copy_(weight)
    return norm


def _add_rms_norm(x: torch.Tensor, a: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``hf_add_rms_norm`` (the fused layers call it directly): ``residual = x + a`` and its RMSNorm."""
    residual, out = torch.empty_like(x), torch.empty_like(x)
    cpu_library.load().hf_add_rms_norm(x.data_ptr(), a.data_ptr(), w.data_ptr(), residual.data_ptr(), out.data_ptr(),
                                       x.numel() // x.shape[-1], x.shape[-1], eps, int(x.dtype == torch.bfloat16))
    return residual, out


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``hf_silu_mul`` (the fused layers call it directly): ``silu(gate) * up`` of ``gate_up = cat(gate, up)``."""
    rows = gate_up.reshape(-1, gate_up.shape[-1])
    inter = gate_up.shape[-1] // 2
    out = torch.empty((*gate_up.shape[:-1], inter), dtype=gate_up.dtype)
    cpu_library.load().hf_silu_mul(rows.data_ptr(), rows.stride(0), out.data_ptr(), inter, rows.shape[0], inter,
                                   int(gate_up.dtype == torch.bfloat16))
    return out


def _assert_rounding_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """fp32: within a few ulps. bf16: a value differs from the reference only where an fp32 value before a
    rounding did by an ulp or so, and rarely: by an ulp of the intermediate that was rounded (up to 2^-7
    relative) plus the last rounding's."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=2e-6, atol=1e-6)
    else:
        torch.testing.assert_close(out.float(), ref.float(), rtol=2 ** -6, atol=1e-5)
        assert (out != ref).float().mean().item() < 0.01


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 576, 40])  # 40: not a multiple of the vector width (scalar path)
def test_rms_norm_kernels_match_transformers(dtype, dim):
    g = torch.Generator().manual_seed(dim)
    x = (torch.randn(3, 7, dim, generator=g) * 3).to(dtype)
    a = torch.randn(3, 7, dim, generator=g).to(dtype)
    w = torch.randn(dim, generator=g).to(dtype)
    norm = _hf_norm(w, 1e-6)
    with torch.inference_mode():
        _assert_rounding_close(cpu_fused_ops.rms_norm(x, w, 1e-6), norm(x))
        residual, normed = _add_rms_norm(x, a, w, 1e-6)
        assert torch.equal(residual, x + a)
        _assert_rounding_close(normed, norm(x + a))
        # A strided last dim is not for the kernel: the caller runs transformers' code instead.
        assert cpu_fused_ops.rms_norm(x.transpose(0, 2), w[:3].contiguous(), 1e-6) is None


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 16, 24])
def test_rope_kernel_is_bit_exact(dtype, head_dim):
    """q and k as the engine has them (strided views of one q/k/v projection), against transformers'
    ``apply_rotary_pos_emb``: the same bits in fp32 and bf16."""
    g = torch.Generator().manual_seed(head_dim)
    tokens, hq, hk = 9, 6, 2
    qkv = torch.randn(tokens, (hq + 2 * hk) * head_dim, generator=g).to(dtype)
    q = qkv[:, : hq * head_dim].view(tokens, hq, head_dim)
    k = qkv[:, hq * head_dim : (hq + hk) * head_dim].view(tokens, hk, head_dim)
    angles = torch.randn(tokens, head_dim // 2, generator=g) * 10
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    q_out, k_out = cpu_fused_ops.rope(q, k, cos, sin)
    q_ref, k_ref = modeling_llama.apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                                      cos[None], sin[None])
    assert q_out.is_contiguous() and k_out.is_contiguous()
    assert torch.equal(q_out, q_ref[0].transpose(0, 1)) and torch.equal(k_out, k_ref[0].transpose(0, 1))


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [128, 1536, 40])
def test_silu_mul_kernel_matches_transformers(dtype, inter):
    g = torch.Generator().manual_seed(inter)
    gate_up = (torch.randn(2, 5, 2 * inter, generator=g) * 4).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    _assert_rounding_close(_silu_mul(gate_up), F.silu(gate) * up)
    # Large |x|: exp's argument is kept finite, silu(-100) is still (about) zero and silu(100) is 100.
    extreme = torch.tensor([[-100.0, 100.0, 1.0, 1.0]], dtype=dtype)
    torch.testing.assert_close(_silu_mul(extreme).float(), torch.tensor([[0.0, 100.0]]))


def _fused_kinds(engine: LLMEngine) -> dict[str, int]:
    counts: dict[str, int] = {}
    for forward in engine.runner.forwards.values():
        if isinstance(forward, fused_layers._Fused):
            counts[type(forward).__name__] = counts.get(type(forward).__name__, 0) + 1
    return counts


def _own_forwards(model: torch.nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if "forward" in m.__dict__]


@needs_kernel
def test_fused_engine_equals_hf_and_stays_call_scoped(tiny_model_dir):
    """A Llama model gets every part fused; the engine's greedy tokens equal HF generate's (ragged batch, chunked
    prefills); plain forwards are bit-identical before, during and after, and unwrap removes the fused forwards."""
    model = build_tiny_model("llama", tiny_model_dir)
    prompts = tiny_prompts(6, seed=11)
    ids = torch.tensor([prompts[0]])
    with torch.inference_mode():
        before = model(ids).logits
    refs = hf_greedy(model, prompts, 16, 0, set(), batch=6)
    engine = LLMEngine(model, None, num_blocks=200, max_num_batched_tokens=16, enable_prefix_caching=False)
    layers = model.config.num_hidden_layers
    assert engine.runner.fused and engine.plan.fused_layers
    assert _fused_kinds(engine) == {"_FusedAttention": layers, "_FusedMLP": layers,
                                    "_FusedRMSNorm": 2 * layers + 1, "_FusedDecoderLayer": layers}
    outs = engine.generate(prompts, GREEDY16, use_tqdm=False)
    assert [o.token_ids for o in outs] == refs
    assert _own_forwards(model) == []  # installed only for the engine's own forwards
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, before)
    engine.close()
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, before)


@needs_kernel
@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3", "phi3", "gemma2", "gpt2"])
def test_only_recognised_modules_are_fused(arch, tiny_model_dir):
    """Attention is fused only where its code is Llama's (not Mistral's, Qwen's or Phi-3's), MLPs and norms where
    theirs are (Phi-3's MLP has one gate_up projection: norms only); Gemma-2 (its own norm, GELU) and GPT-2 get
    nothing. Greedy tokens still equal HF's."""
    model = build_tiny_model(arch, tiny_model_dir)
    prompts = tiny_prompts(4, seed=12)
    refs = hf_greedy(model, prompts, 16, 0, set(), batch=4)
    engine = LLMEngine(model, None, num_blocks=200, max_num_batched_tokens=32, enable_prefix_caching=False)
    kinds = _fused_kinds(engine)
    assert "_FusedAttention" not in kinds and "_FusedDecoderLayer" not in kinds
    if arch in ("gemma2", "gpt2"):
        assert kinds == {} and not engine.runner.fused
    else:
        assert kinds.get("_FusedRMSNorm", 0) >= 2 * model.config.num_hidden_layers and engine.runner.fused
        assert ("_FusedMLP" in kinds) == (arch != "phi3")
    assert [o.token_ids for o in engine.generate(prompts, GREEDY16, use_tqdm=False)] == refs
    engine.shutdown()


@needs_kernel
def test_fused_engine_agrees_with_unfused_and_sees_new_weights(smollm2, chat_ids):
    """SmolLM2 (head dim 64: the kernels' vector paths): same greedy tokens and close logprobs with and without
    fused layers. Then a weight changed in place between two calls: the same engine packs the q/k/v group again
    (and only it) and generates what an unfused engine on the changed model generates."""
    model, tok = smollm2
    params = SamplingParams(max_new_tokens=16, temperature=0, logprobs=1)
    outs = {}
    for fuse in (False, True):
        engine = LLMEngine(model, tok, num_blocks=512, enable_prefix_caching=False, fuse_layers=fuse)
        assert engine.runner.fused == fuse
        outs[fuse] = engine.generate(chat_ids[:8], params, use_tqdm=False)
        engine.shutdown()
    assert [o.token_ids for o in outs[True]] == [o.token_ids for o in outs[False]]
    for a, b in zip(outs[True], outs[False]):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-3, rtol=0)

    attn = model.model.layers[0].self_attn
    other = model.model.layers[1].self_attn
    engine = LLMEngine(model, tok, num_blocks=512, enable_prefix_caching=False)
    group, other_group = engine.runner.forwards[attn].group, engine.runner.forwards[other].group
    weight = attn.q_proj.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(0.5)
        changed = engine.generate(chat_ids[:8], params, use_tqdm=False)
        assert engine.runner.forwards[attn].group is not group  # re-packed from the changed weight
        assert engine.runner.forwards[other].group is other_group  # unchanged: kept
        engine.close()
        unfused = LLMEngine(model, tok, num_blocks=512, enable_prefix_caching=False, fuse_layers=False)
        expected = unfused.generate(chat_ids[:8], params, use_tqdm=False)
        unfused.close()
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert [o.token_ids for o in changed] == [o.token_ids for o in expected]
    assert [o.token_ids for o in changed] != [o.token_ids for o in outs[True]]


@needs_kernel
@pytest.mark.parametrize("how", ["option", "environment"])
def test_kernel_switch_off_runs_transformers_code(tiny_model_dir, monkeypatch, how):
    """``cpu_kernels=False`` (or ``HF_PAGED_CPU_KERNEL=0`` when the engine is built; the plan is decided then): no
    fused modules, transformers' own attention runs, HF's tokens."""
    model = build_tiny_model("llama", tiny_model_dir)
    prompts = tiny_prompts(3, seed=13)
    refs = hf_greedy(model, prompts, 16, 0, set(), batch=3)
    if how == "environment":
        monkeypatch.setenv("HF_PAGED_CPU_KERNEL", "0")
    engine = LLMEngine(model, None, num_blocks=200, enable_prefix_caching=False,
                       **({"cpu_kernels": False} if how == "option" else {}))
    monkeypatch.delenv("HF_PAGED_CPU_KERNEL", raising=False)
    assert engine.plan.attention == "torch" and not engine.plan.fused_layers and not engine.runner.fused
    calls = []
    original = modeling_llama.LlamaAttention.forward
    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    outs = engine.generate(prompts, GREEDY16, use_tqdm=False)
    engine.shutdown()
    assert [o.token_ids for o in outs] == refs
    assert calls  # transformers' own attention ran


@pytest.mark.skipif(not amx_available(), reason="no AMX tiles on this CPU")
@pytest.mark.parametrize("rows", [1, 5, 16, 33, 256])
def test_amx_linear_matches_f_linear(rows):
    """bf16 products on AMX tiles: each output is the fp32 product rounded once to bf16 (the accumulation order
    aside), for any row count up to AMX_MAX_ROWS, rows read with a stride, with and without bias."""
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 64, generator=g).to(torch.bfloat16)
    bias = torch.randn(96, generator=g).to(torch.bfloat16)
    wide = torch.randn(rows, 100, generator=g).to(torch.bfloat16)
    x = wide[:, 10:74]  # rows with a stride of 100 elements
    packed = AmxWeight(weight)
    for b in (None, bias):
        out = packed.matmul(x, b)
        ref = F.linear(x.float(), weight.float(), None if b is None else b.float())
        assert out.dtype == torch.bfloat16 and out.shape == (rows, 96)
        assert ((out.float() - ref).abs() <= ref.abs() * 2 ** -8 + 1e-4).all()
    assert packed.matmul(torch.zeros(AMX_MAX_ROWS + 1, 64, dtype=torch.bfloat16), None) is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 7, 33, SMALL_MAX_ROWS, SMALL_MAX_ROWS + 1])
def test_small_rows_linear_matches_f_linear(cpu_kernels, dtype, rows):
    """hf_paged's AVX-512 linear (fp32 FMAs; bf16 dot products, rounded once to bf16): F.linear's product for any
    row count up to SMALL_MAX_ROWS (oneDNN's above), rows read with a stride, with and without bias, and a column
    count that is not a multiple of the kernel's 64-column groups."""
    if not small_rows_available(dtype):
        pytest.skip(f"no AVX-512{' BF16' if dtype == torch.bfloat16 else ''} in this CPU")
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(100, 64, generator=g).to(dtype)
    bias = torch.randn(100, generator=g).to(dtype)
    x = torch.randn(rows, 90, generator=g).to(dtype)[:, 13:77]  # rows with a stride of 90 elements
    packed = SmallRowsWeight(weight)
    for b in (None, bias):
        out = packed.matmul(x, b)
        ref = F.linear(x.float(), weight.float(), None if b is None else b.float())
        assert out.dtype == dtype and out.shape == (rows, 100)
        ulp = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -20
        assert ((out.float() - ref).abs() <= ref.abs() * ulp + 1e-4).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_features", [150, 164, 576])
def test_small_rows_linear_bits_do_not_depend_on_rows_or_threads(cpu_kernels, dtype, out_features):
    """A row's product has the same bits alone (a decode step) as among 33 rows (a verification step, whose threads
    split groups that do not divide evenly between them in halves), for 1-8 threads; column counts of 3 and 9
    groups of 64, the last 22 or 36 columns wide or full."""
    if not small_rows_available(dtype):
        pytest.skip(f"no AVX-512{' BF16' if dtype == torch.bfloat16 else ''} in this CPU")
    g = torch.Generator().manual_seed(out_features)
    weight = torch.randn(out_features, 128, generator=g).to(dtype)
    bias = torch.randn(out_features, generator=g).to(dtype)
    x = torch.randn(33, 128, generator=g).to(dtype)
    packed = SmallRowsWeight(weight)
    ref = F.linear(x.float(), weight.float(), bias.float())
    threads = torch.get_num_threads()
    try:
        outs = {}
        for t in (1, 2, 3, 5, 8):  # 5 and 8: more threads than halves of groups, some left idle
            torch.set_num_threads(t)
            outs[t] = packed.matmul(x, bias)
            alone = torch.cat([packed.matmul(x[i:i + 1], bias) for i in range(len(x))])
            assert torch.equal(outs[t], alone), f"{t} threads: rows among 33 differ from rows alone"
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outs[1], out) for out in outs.values())
    ulp = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -20
    assert ((outs[1].float() - ref).abs() <= ref.abs() * ulp + 1e-4).all()


@needs_kernel
def test_bf16_fused_engine_follows_hf_logits(tiny_model_dir):
    """A bf16 Llama through the fused engine (AMX linears where the CPU has them): every generated token is, by
    transformers' own forward over the same sequence, within bf16 noise of the most likely one, and the engine's
    logprobs match transformers'."""
    model = build_tiny_model("llama", tiny_model_dir).to(torch.bfloat16)
    prompts = tiny_prompts(5, seed=14)
    engine = LLMEngine(model, None, num_blocks=200, max_num_batched_tokens=32, enable_prefix_caching=False)
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True, logprobs=1)
    outs = engine.generate(prompts, params, use_tqdm=False)
    engine.shutdown()
    assert engine.runner.fused
    for prompt, out in zip(prompts, outs):
        ids = torch.tensor([prompt + out.token_ids])
        with torch.inference_mode():
            logp = torch.log_softmax(model(ids).logits[0, len(prompt) - 1 : -1].float(), dim=-1)
        chosen = logp.gather(1, torch.tensor(out.token_ids).unsqueeze(1)).squeeze(1)
        assert (logp.max(dim=-1).values - chosen <= 0.05).all()
        torch.testing.assert_close(torch.tensor(out.logprobs), chosen, atol=0.05, rtol=0)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_layer_in_one_call_is_bit_identical(tiny_model_dir, monkeypatch, dtype):
    """A decode-only step on hf_paged's linear kernels (AMX for bf16 where the CPU has it, else AVX-512) runs each
    Llama layer as one C call: the same kernels in the same order as the fused Python path, so the same tokens and
    the same logprobs, bit for bit."""
    if not (small_rows_available(dtype) or (dtype == torch.bfloat16 and amx_available())):
        pytest.skip("neither AMX nor AVX-512 linears on this CPU")
    model = build_tiny_model("llama", tiny_model_dir).to(dtype)
    prompts = tiny_prompts(6, seed=15)
    params = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True, logprobs=1)
    calls, steps_built = [], []
    layer_class = fused_layers._FusedDecoderLayer
    one_call, step_args = layer_class._decode_in_one_call, layer_class._one_call_step
    monkeypatch.setattr(layer_class, "_decode_in_one_call", lambda self, *a: calls.append(1) or one_call(self, *a))
    monkeypatch.setattr(layer_class, "_one_call_step", lambda self, *a: steps_built.append(1) or step_args(self, *a))
    outs = {}
    for flag in (True, False):
        engine = LLMEngine(model, None, num_blocks=200, max_num_batched_tokens=32, enable_prefix_caching=False)
        assert engine.plan.one_call_layers
        for forward in engine.runner.forwards.values():
            if isinstance(forward, fused_layers._FusedDecoderLayer):
                forward.one_call = flag
        # Stepped here, all requests queued first: the same steps both times (bf16 results depend on how tokens
        # are batched, and the engine thread would start stepping while requests still arrive).
        seqs = [engine.make_sequence(p, params) for p in prompts]
        for seq in seqs:
            engine.scheduler.add(seq)
        while not all(seq.finished for seq in seqs):
            engine.step()
        outs[flag] = [seq.output() for seq in seqs]
        engine.close()
        if flag:  # it ran, the step's C arguments built by the first layer of each forward only
            assert calls and len(calls) == len(steps_built) * model.config.num_hidden_layers
    assert [o.token_ids for o in outs[True]] == [o.token_ids for o in outs[False]]
    assert [o.logprobs for o in outs[True]] == [o.logprobs for o in outs[False]]
