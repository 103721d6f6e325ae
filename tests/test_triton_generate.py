"""A whole engine generate of tiny models with the Triton kernels (in the Triton interpreter, on CPU)
must equal the PyTorch path token for token. Runs in a fresh interpreter: TRITON_INTERPRET must be set
before triton is first imported, and transformers (imported by conftest) imports it."""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import os, torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from hf_paged import LLMEngine, SamplingParams
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    configs = {
        "llama": AutoConfig.for_model("llama", **common),
        "gemma2": AutoConfig.for_model("gemma2", head_dim=16, sliding_window=6, attn_logit_softcapping=50.0,
                                       query_pre_attn_scalar=16, **common),
    }
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (5, 17, 9)]
    params = SamplingParams(max_new_tokens=6, temperature=0, ignore_eos=True)
    for name, config in configs.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
        results = {}
        for path in ("torch", "triton"):
            os.environ["HF_PAGED_FORCE_TRITON"] = "1" if path == "triton" else "0"
            # block_size 4 and a 7-token budget: chunked prefill, prefix reuse and decode all run.
            engine = LLMEngine(model, None, num_blocks=40, block_size=4, max_num_batched_tokens=7)
            results[path] = [o.token_ids for o in engine.generate(prompts, params, use_tqdm=False)]
            assert engine.pool.num_free_blocks == engine.pool.num_blocks
        assert results["torch"] == results["triton"], (name, results)
        print(name, "equal", results["torch"][0])
""")


def test_engine_generate_with_triton_kernels_equals_torch_path():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("equal") == 2
