"""Architecture coverage: every model type ``AutoModelForCausalLM`` maps in the installed transformers, as a tiny
random model (``tests/model_zoo.py``), gives HF's own tokens through hf_paged — on the engine (greedy, beams, a
prefix-cache hit, chunked prefill, ``PagedCache`` in HF generate), or through the fallback with a non-empty reason
(see ``tests/model_coverage.py``). Architectures the zoo cannot build are skipped with the zoo's reason.

Marker: ``coverage`` (``pytest -m coverage`` selects these tests, ``-m "not coverage"`` leaves them out). The whole
zoo takes about a minute (one CPU thread).
"""

from __future__ import annotations

import pytest

from model_coverage import check_architecture
from model_zoo import ARCHITECTURES

pytestmark = pytest.mark.coverage

_skipped: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def _print_skipped():
    yield
    if _skipped:
        lines = "\n".join(f"  {name}: {why}" for name, why in sorted(_skipped.items()))
        print(f"\nmodel coverage: {len(_skipped)} architectures skipped:\n{lines}")


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_architecture(model_type: str) -> None:
    result = check_architecture(model_type)
    if result.status == "skipped":
        assert result.reason, f"{model_type} skipped without a reason"
        _skipped[model_type] = result.reason
        pytest.skip(f"{model_type}: {result.reason}")
    assert result.status in ("engine", "fallback"), result
    if result.status == "fallback":
        assert result.reason, f"{model_type} falls back without a reason"
    if not result.passed:
        where = f"{result.status}: {result.reason}" if result.reason else result.status
        pytest.fail(f"{model_type} ({where}):\n  " + "\n  ".join(result.failures()), pytrace=False)
