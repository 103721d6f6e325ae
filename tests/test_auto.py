"""One line for an existing script: each script in examples/ prints the same output unchanged and with
``import hf_paged.auto`` added (greedy fp32), the engine serving every generate call with no fallback logged;
enable()/disable() wrap what from_pretrained loads and undo it; custom (trust_remote_code) classes that route
attention through transformers' interface run on the engine, others keep HF generate with the reason logged."""

import contextlib
import importlib
import io
import json
import logging
import runpy
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_paged
from hf_paged import api
from hf_paged.engine.llm_engine import LLMEngine
from hf_paged.models import default_model_dir

from conftest import build_tiny_model, tiny_prompts
from dropin_helpers import one_thread  # noqa: F401

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# example -> how many engine requests its generate calls make
EXAMPLE_REQUESTS = {"generate_loop.py": 3, "pipeline_batch.py": 6, "streaming_chat.py": 2}


def run_example(name: str, tmp_path: Path, monkeypatch, one_line: bool) -> str:
    source = (EXAMPLES / name).read_text()
    if one_line:
        source = "import hf_paged.auto\n" + source
    script = tmp_path / ("auto_" if one_line else "plain_") / name
    script.parent.mkdir(exist_ok=True)
    script.write_text(source)
    monkeypatch.setattr(sys, "argv", [str(script), str(default_model_dir())])
    monkeypatch.setenv("HF_PAGED_ENGINE_OPTIONS", '{"memory_bytes": 134217728}')  # 128 MiB: quick to allocate
    sys.modules.pop("hf_paged.auto", None)  # so that the line runs as in a fresh interpreter
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(str(script), run_name="__main__")
    finally:
        hf_paged.disable()
        from hf_paged.integrations import pipeline as pipeline_patch

        pipeline_patch.install()  # what `import hf_paged` installs, for the tests that follow
    return out.getvalue()


@pytest.mark.parametrize("name", sorted(EXAMPLE_REQUESTS))
def test_example_output_is_unchanged_by_the_one_line(name, tmp_path, monkeypatch, caplog):
    plain = run_example(name, tmp_path, monkeypatch, one_line=False)
    submitted = []
    submit = LLMEngine.submit

    def counting_submit(self, *args, **kwargs):
        submitted.append(args[0])
        return submit(self, *args, **kwargs)

    monkeypatch.setattr(LLMEngine, "submit", counting_submit)
    with caplog.at_level(logging.INFO, logger="hf_paged"):
        with_engine = run_example(name, tmp_path, monkeypatch, one_line=True)
    assert with_engine == plain and plain.strip()
    assert "generates on the engine" in caplog.text
    for fallback in ("HF generate", "not wrapping", "HF's pipeline"):
        assert fallback not in caplog.text
    assert len(submitted) == EXAMPLE_REQUESTS[name]  # every generate call was an engine request


def test_enable_wraps_loaded_models_and_disable_undoes_it(tiny_model_dir):
    build_tiny_model("llama", tiny_model_dir)
    original = AutoModelForCausalLM.__dict__["from_pretrained"]
    ids = torch.tensor([tiny_prompts(1, seed=3)[0]])
    hf_paged.enable(num_blocks=64)
    try:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir / "llama", dtype=torch.float32)
        assert api.is_wrapped(model)
        out = model.generate(ids, max_new_tokens=10, do_sample=False)
        assert hf_paged.get_engine(model).metrics.steps > 0
    finally:
        hf_paged.disable()
        from hf_paged.integrations import pipeline as pipeline_patch

        pipeline_patch.install()
    assert AutoModelForCausalLM.__dict__["from_pretrained"] is original
    assert not api.is_wrapped(model) and "generate" not in model.__dict__
    assert torch.equal(model.generate(ids, max_new_tokens=10, do_sample=False), out)  # HF's own tokens
    assert not api.is_wrapped(AutoModelForCausalLM.from_pretrained(tiny_model_dir / "llama"))


def test_enable_wraps_concrete_classes_too(tiny_model_dir):
    """TRL and many scripts load through the concrete class (``LlamaForCausalLM.from_pretrained``); a base model
    (no LM head) is left alone."""
    from transformers import LlamaForCausalLM, LlamaModel, PreTrainedModel

    build_tiny_model("llama", tiny_model_dir)
    original = PreTrainedModel.__dict__["from_pretrained"]
    hf_paged.enable(num_blocks=64)
    try:
        model = LlamaForCausalLM.from_pretrained(tiny_model_dir / "llama", dtype=torch.float32)
        base = LlamaModel.from_pretrained(tiny_model_dir / "llama", dtype=torch.float32)
        assert api.is_wrapped(model) and not api.is_wrapped(base)
        model.generate(torch.tensor([tiny_prompts(1, seed=4)[0]]), max_new_tokens=4, do_sample=False)
        assert hf_paged.get_engine(model).metrics.steps > 0
    finally:
        hf_paged.disable()
        from hf_paged.integrations import pipeline as pipeline_patch

        pipeline_patch.install()
    assert PreTrainedModel.__dict__["from_pretrained"] is original and not api.is_wrapped(model)


def test_enable_rejects_bad_options(monkeypatch):
    with pytest.raises(ValueError, match="num_blocks"):
        hf_paged.enable(num_blocks=-1)
    monkeypatch.setenv("HF_PAGED_ENGINE_OPTIONS", "[1, 2]")
    sys.modules.pop("hf_paged.auto", None)
    with pytest.raises(ValueError, match="HF_PAGED_ENGINE_OPTIONS"):
        importlib.import_module("hf_paged.auto")
    sys.modules.pop("hf_paged.auto", None)
    assert not hf_paged.integrations.auto_model.enabled()


# ---- trust_remote_code style custom classes --------------------------------------------------------------------
_CONFIG_CODE = '''
from transformers import LlamaConfig


class CustomLlamaConfig(LlamaConfig):
    model_type = "custom_llama"
'''

_INTERFACE_ATTENTION = '''
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                    eager_attention_forward)
        out, _ = attention_interface(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
        out = out.reshape(*shape, -1)
'''

_OWN_ATTENTION = '''
        k, v = repeat_kv(k, self.num_key_value_groups), repeat_kv(v, self.num_key_value_groups)
        causal = attention_mask is None and q.shape[2] > 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, is_causal=causal, scale=self.scaling)
        out = out.transpose(1, 2).reshape(*shape, -1)
'''

_MODEL_CODE = '''
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward, repeat_kv

from .configuration_custom import CustomLlamaConfig


class CustomAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim ** -0.5
        self.is_causal = True
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                **kwargs):
        shape = hidden_states.shape[:-1]
        q = self.q_proj(hidden_states).view(*shape, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(*shape, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(*shape, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
<<ATTENTION_BODY>>
        return self.o_proj(out), None


class CustomLlamaForCausalLM(LlamaForCausalLM):
    config_class = CustomLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        for i, layer in enumerate(self.model.layers):
            layer.self_attn = CustomAttention(config, i)
        self.post_init()
'''


def _remote_code_model(root: Path, name: str, attention: str) -> Path:
    folder = root / name
    if not (folder / "config.json").exists():
        build_tiny_model("llama", root)  # saves the weights in root / "llama"
        folder.mkdir()
        for f in (root / "llama").iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        config = json.loads((folder / "config.json").read_text())
        config.update(model_type="custom_llama", architectures=["CustomLlamaForCausalLM"],
                      auto_map={"AutoConfig": "configuration_custom.CustomLlamaConfig",
                                "AutoModelForCausalLM": "modeling_custom.CustomLlamaForCausalLM"})
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "configuration_custom.py").write_text(_CONFIG_CODE)
        (folder / "modeling_custom.py").write_text(_MODEL_CODE.replace("<<ATTENTION_BODY>>", attention.strip("\n")))
    return folder


@pytest.mark.parametrize("routes_through_interface", [True, False], ids=["interface", "own_attention"])
def test_remote_code_model(tiny_model_dir, routes_through_interface, caplog):
    name = "remote_interface" if routes_through_interface else "remote_own"
    folder = _remote_code_model(tiny_model_dir, name,
                                _INTERFACE_ATTENTION if routes_through_interface else _OWN_ATTENTION)
    ids = torch.tensor(tiny_prompts(1, seed=5))
    plain = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    expected = plain.generate(ids, max_new_tokens=12, do_sample=False)
    hf_paged.enable(num_blocks=64)
    try:
        with caplog.at_level(logging.INFO, logger="hf_paged"):
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
            out = model.generate(ids, max_new_tokens=12, do_sample=False)
        assert type(model).__name__ == "CustomLlamaForCausalLM"
        assert api.is_wrapped(model) is routes_through_interface
        if not routes_through_interface:
            lines = [r.getMessage() for r in caplog.records if "not wrapping" in r.getMessage()]
            assert len(lines) == 1 and "AttentionInterface" in lines[0]
        else:
            assert "HF generate" not in caplog.text and hf_paged.get_engine(model).metrics.steps > 0
        assert torch.equal(out, expected)
    finally:
        hf_paged.disable()
        from hf_paged.integrations import pipeline as pipeline_patch

        pipeline_patch.install()
