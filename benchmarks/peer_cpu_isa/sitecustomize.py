"""Started by every Python process of a vLLM peer run that emulates a lower CPU tier (``vs_vllm.py --cpu-isa``
puts this folder on the peer's ``PYTHONPATH`` and sets ``HF_PAGED_PEER_CPU_ISA``): torch's CPU-feature queries,
through which vLLM picks its kernels (its ``_C_AVX2`` or ``_C_AVX512`` library, AMX and AVX512-BF16 paths) and
inductor its vector ISA, answer as a CPU of that tier would. Torch's own kernels, MKL and oneDNN are capped by the
environment the run inherits (``hf_paged.execution.kernels.cpu_isa.emulation_env``)."""

import os

_TIER = os.environ.get("HF_PAGED_PEER_CPU_ISA")
_ORDER = ("generic", "avx2", "avx512", "avx512_bf16", "amx")

if _TIER in _ORDER:
    import torch.cpu

    _level = _ORDER.index(_TIER)

    def _capped(query, tier):
        return lambda: _ORDER.index(tier) <= _level and query()

    for _name, _tier in (("_is_avx2_supported", "avx2"), ("_is_avx512_supported", "avx512"),
                         ("_is_avx512_bf16_supported", "avx512_bf16"), ("_is_vnni_supported", "avx512_bf16"),
                         ("_is_amx_tile_supported", "amx"), ("_is_amx_fp16_supported", "amx")):
        if hasattr(torch.cpu, _name):
            setattr(torch.cpu, _name, _capped(getattr(torch.cpu, _name), _tier))
