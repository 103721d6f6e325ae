"""Front doors into HF's own entry points: ``pipeline(..., backend="hf_paged")`` and ``hf_paged.auto``."""
