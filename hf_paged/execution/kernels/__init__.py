"""The kernels: PyTorch implementations (the CPU path and the test oracle), C kernels for the CPU (``csrc/``) and
Triton kernels for CUDA, reached through ``dispatch`` by the caller's plan; :func:`triton_importable` is the probe
the plan asks before choosing Triton."""

import functools
import logging


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    """Whether triton imports here (tried once per process)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401

        return True
    except Exception as exc:  # ImportError, or a broken install
        logging.getLogger(__name__).warning("triton is not usable (%s); hf_paged kernels fall back to PyTorch", exc)
        return False
