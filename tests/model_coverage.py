"""Architecture coverage: does hf_paged give transformers' tokens for one zoo architecture (``tests/model_zoo.py``)?

``check_architecture(model_type)`` builds the tiny model once and runs, in this process:

* ``reference``: HF ``generate`` greedy (8 new tokens) and beam search (3 beams, 4 new tokens) on the left-padded
  batch of the four zoo prompts, each twice: the two runs must agree (else the reference itself is not
  deterministic and nothing can be compared);
* through ``hf_paged.wrap(model, None, block_size=8, ...)``: ``greedy`` and ``beams`` (the same calls, the same
  tokens), ``prefix_cache`` (a prompt, then a second one sharing its first two blocks: the second's tokens equal HF's;
  the detail says how many prompt tokens came from the prefix cache), ``chunked_prefill`` (an engine with
  ``max_num_batched_tokens=8``, smaller than every prompt: the batch's tokens equal HF's), ``preemption`` (a pool
  that holds the longest sequence but not the whole batch: sequences are preempted and recomputed, the tokens equal
  HF's; the detail says how many preemptions);
* ``unwrap``: ``hf_paged.unwrap`` gives back HF's own ``generate`` (and its tokens);
* ``paged_cache``: ``past_key_values=hf_paged.PagedCache(model)`` in plain HF ``generate`` on a fresh copy of the
  model: HF's tokens, or a ``ValueError`` from ``PagedCache(...)`` itself before generating (a clean refusal, kept
  in the detail).

The ``Result`` says which path ``wrap`` took (``hf_paged.fallback_reason``: "engine", or "fallback" with the
reason) and, per check, ``ok`` / ``refused`` / ``mismatch`` (which rows differ) / ``error`` (the exception).
Architectures the zoo cannot build are "skipped" with the zoo's reason. Everything runs on one CPU thread (tiny
models: thread hand-offs cost more than they save, ~100x on a loaded 2-core machine).
"""

from __future__ import annotations

import copy
import logging
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch

import hf_paged

try:  # run as tests/model_coverage.py from the repository root, or imported as part of the tests folder
    from . import model_zoo as zoo
except ImportError:  # pragma: no cover
    import model_zoo as zoo

logger = logging.getLogger(__name__)

MAX_NEW_TOKENS = 8
BEAM_NEW_TOKENS = 4
NUM_BEAMS = 3
BLOCK_SIZE = 8
NUM_BLOCKS = 256
CHUNK_TOKENS = 8  # chunked prefill: the step budget is smaller than every prompt
CALL_TIMEOUT_S = 120.0  # one generate call; past it the check is an error (a hung engine must not hang the zoo)

CHECKS = ("reference", "greedy", "beams", "prefix_cache", "chunked_prefill", "preemption", "unwrap", "paged_cache")
# Checks that pass with these statuses: "n/a" where HF itself refuses the call (beam search on some recurrent
# models); a PagedCache may also refuse a model cleanly, before generating.
PASSING = {"ok", "n/a"}
PASSING_PAGED_CACHE = {"ok", "n/a", "refused"}


@dataclass
class Check:
    status: str  # "ok" | "n/a" (HF refuses the call) | "refused" | "mismatch" | "error" | "not run"
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status in PASSING


@dataclass
class Result:
    model_type: str
    status: str  # "engine" | "fallback" | "skipped"
    reason: str | None = None  # fallback reason, skip reason, or what failed before the checks
    checks: dict[str, Check] = field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Skipped with a reason; or every check passed (a fallback needs a reason)."""
        if self.status == "skipped":
            return bool(self.reason)
        if self.status == "fallback" and not self.reason:
            return False
        if set(self.checks) != set(CHECKS):
            return False
        for name, check in self.checks.items():
            allowed = PASSING_PAGED_CACHE if name == "paged_cache" else PASSING
            if check.status not in allowed:
                return False
        return True

    def failures(self) -> list[str]:
        """The failing checks, those failing the same way named together: ``"greedy, beams: error ..."``."""
        grouped: dict[tuple[str, str], list[str]] = {}
        for name, check in self.checks.items():
            allowed = PASSING_PAGED_CACHE if name == "paged_cache" else PASSING
            if check.status not in allowed:
                grouped.setdefault((check.status, check.detail), []).append(name)
        return [f"{', '.join(names)}: {status} {detail}".rstrip() for (status, detail), names in grouped.items()]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- helpers --------------------------------------------------------------------------------------------------
@contextmanager
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _timed_call(fn: Callable[[], Any], timeout: float = CALL_TIMEOUT_S) -> Any:
    """``fn()`` in a daemon thread; raises ``TimeoutError`` past ``timeout`` (the thread is left behind)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True, name="model-coverage-call")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"no result after {timeout:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _error(exc: BaseException) -> Check:
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" (at {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno})" if frame else ""
    text = " ".join(str(exc).split())
    return Check("error", f"{type(exc).__name__}: {text[:300]}{where}")


def _sequences(out: Any) -> torch.Tensor:
    return out.sequences if hasattr(out, "sequences") else out


def _compare(got: torch.Tensor, want: torch.Tensor, what: str = "rows") -> Check:
    got, want = _sequences(got), _sequences(want)
    if got.shape != want.shape:
        return Check("mismatch", f"shape {tuple(got.shape)} != HF {tuple(want.shape)}")
    differ = [i for i in range(want.shape[0]) if not torch.equal(got[i], want[i])]
    if differ:
        first = differ[0]
        cols = (got[first] != want[first]).nonzero().flatten().tolist()
        return Check("mismatch", f"{what} {differ} of {want.shape[0]} differ (row {first} from column {cols[0]}: "
                                 f"{got[first, cols[0]:].tolist()} vs HF {want[first, cols[0]:].tolist()})")
    return Check("ok")


def _compare_unpadded(got: torch.Tensor, want: torch.Tensor, model: torch.nn.Module, ids: torch.Tensor,
                      mask: torch.Tensor, notes: list[str]) -> Check:
    """``_compare`` of a wrapped greedy batch with HF's (``model``: an unwrapped copy); a row that differs passes where
    HF's own generate of that row alone (unpadded, which is what the engine runs) differs from its padded row and equals
    the wrapped one: a model whose HF computation depends on the padding (Llama 4's NoPE temperature tuning counts pad
    positions)."""
    check = _compare(got, want)
    if check.status != "mismatch" or got.shape != want.shape:
        return check
    got_new, want_new = _sequences(got)[:, ids.shape[1]:], _sequences(want)[:, ids.shape[1]:]
    differ = [i for i in range(want_new.shape[0]) if not torch.equal(got_new[i], want_new[i])]
    for i in differ:
        alone = _sequences(_greedy(model, *_single(ids[i][mask[i].bool()].tolist())))[0, int(mask[i].sum()):]
        if torch.equal(alone, want_new[i]) or not torch.equal(alone, got_new[i]):
            return check
    note = f"HF's padded batch differs from its own unpadded generate in rows {differ}: compared with those"
    if note not in notes:
        notes.append(note)
    return Check("ok", f"rows {differ}: HF's unpadded generate")


def _greedy(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    return _timed_call(lambda: model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW_TOKENS,
                                              do_sample=False, **kwargs))


def _beams(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _timed_call(lambda: model.generate(ids, attention_mask=mask, max_new_tokens=BEAM_NEW_TOKENS,
                                              num_beams=NUM_BEAMS, do_sample=False))


def _single(prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([prompt], dtype=torch.long)
    return ids, torch.ones_like(ids)


def prefix_prompts() -> tuple[list[int], list[int]]:
    """Two prompts sharing their first two blocks (16 tokens), neither a zoo prompt."""
    g = torch.Generator().manual_seed(99)
    first = torch.randint(3, zoo.VOCAB, (27,), generator=g).tolist()
    second = first[: 2 * BLOCK_SIZE] + torch.randint(3, zoo.VOCAB, (13,), generator=g).tolist()
    return first, second


def _path(model: torch.nn.Module) -> str | None:
    """None when ``model``'s (wrapped) ``generate`` runs on the engine, else the reason it falls back."""
    public = getattr(hf_paged, "fallback_reason", None)
    if public is not None:
        return public(model)
    slot = model.__dict__.get("_hf_paged")  # shim for versions without hf_paged.fallback_reason
    if slot is not None and getattr(slot, "engine", None) is not None:
        return None
    from hf_paged.execution.patches.attention import supports_paged_attention

    ok, why = supports_paged_attention(model)
    return "not wrapped" + (f": {why}" if why else "")


def _prefix_tokens(model: torch.nn.Module) -> int | None:
    slot = model.__dict__.get("_hf_paged")
    engine = getattr(slot, "engine", None)
    kv = getattr(engine, "kv", None)
    return getattr(kv, "num_prefix_cached_tokens", None)


def _unwrap(model: torch.nn.Module) -> None:
    _timed_call(lambda: hf_paged.unwrap(model), timeout=30.0)


# ---- the checks -----------------------------------------------------------------------------------------------
def check_architecture(model_type: str) -> Result:
    """Run every check for one architecture (see the module docstring); never raises."""
    start = time.perf_counter()
    result = Result(model_type, "fallback")
    with _one_thread():
        try:
            _run(model_type, result)
        except zoo.Skip as skip:
            result.status, result.reason = "skipped", str(skip)
        except BaseException as exc:  # noqa: BLE001 - a result, not an exception, for every architecture
            if isinstance(exc, KeyboardInterrupt):
                raise
            result.reason = result.reason or f"check failed before finishing: {_error(exc).detail}"
    if result.status != "skipped":
        result.checks = {name: result.checks.get(name, Check("not run", "an earlier step failed")) for name in CHECKS}
    result.seconds = round(time.perf_counter() - start, 2)
    return result


def _run(model_type: str, result: Result) -> None:
    model = zoo.build_model(model_type)
    fresh = copy.deepcopy(model)  # for the PagedCache check: never wrapped
    ids, mask = zoo.padded_batch(zoo.PROMPTS)
    first, second = prefix_prompts()
    checks = result.checks

    # ---- HF reference (twice: it must be deterministic to be a reference) ----
    try:
        ref_greedy = _greedy(model, ids, mask)
        ref_first = _greedy(model, *_single(first))
        ref_second = _greedy(model, *_single(second))
        again = _compare(_greedy(model, ids, mask), ref_greedy)
    except Exception as exc:
        checks["reference"] = _error(exc)
        result.reason = f"HF generate itself fails: {checks['reference'].detail}"
        return
    try:
        ref_beams = _beams(model, ids, mask)
    except (ValueError, NotImplementedError) as exc:  # HF refuses beam search for this model: nothing to compare
        ref_beams, again_beams = None, Check("ok")
        checks["beams"] = Check("n/a", f"HF generate refuses beam search: {_error(exc).detail}")
    else:
        again_beams = _compare(_beams(model, ids, mask), ref_beams, "beam rows")
    if again.status != "ok":
        checks["reference"] = Check("mismatch", f"HF greedy run twice: {again.detail}")
    elif again_beams.status != "ok":
        checks["reference"] = Check("mismatch", f"HF beam search run twice: {again_beams.detail}")
    else:
        checks["reference"] = Check("ok")
    new = _sequences(ref_greedy)[:, ids.shape[1]:].tolist()
    if all(len(set(row)) == 1 for row in new) or all(row == new[0] for row in new):
        result.notes.append(f"degenerate reference tokens: {new}")

    # ---- wrapped: greedy, beams, prefix cache ----
    try:
        hf_paged.wrap(model, None, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, max_num_batched_tokens=512)
    except Exception as exc:
        for name in ("greedy", "beams", "prefix_cache", "chunked_prefill", "preemption", "unwrap"):
            checks.setdefault(name, _error(exc))
    else:
        try:
            for name, call, want in (("greedy", lambda: _greedy(model, ids, mask), ref_greedy),
                                     ("beams", lambda: _beams(model, ids, mask), ref_beams)):
                if want is None:
                    continue
                try:
                    checks[name] = _compare(call(), want, "beam rows") if name == "beams" else \
                        _compare_unpadded(call(), want, fresh, ids, mask, result.notes)
                except Exception as exc:
                    checks[name] = _error(exc)
            try:
                result.reason = _path(model)
            except Exception as exc:
                result.reason = f"fallback_reason raised: {_error(exc).detail}"
            result.status = "engine" if result.reason is None else "fallback"
            try:
                before = _prefix_tokens(model) or 0
                got_first = _greedy(model, *_single(first))
                got_second = _greedy(model, *_single(second))
                check = _compare(got_first, ref_first, "first prompt")
                if check.status == "ok":
                    check = _compare(got_second, ref_second, "second prompt")
                after = _prefix_tokens(model)
                if check.status == "ok" and after is not None:
                    check.detail = f"{after - before} prompt tokens from the prefix cache"
                checks["prefix_cache"] = check
            except Exception as exc:
                checks["prefix_cache"] = _error(exc)
        finally:
            _unwrap(model)
        # ---- chunked prefill: a step budget smaller than the prompts ----
        try:
            hf_paged.wrap(model, None, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE,
                          max_num_batched_tokens=CHUNK_TOKENS)
            try:
                checks["chunked_prefill"] = _compare_unpadded(_greedy(model, ids, mask), ref_greedy, fresh, ids, mask,
                                                              result.notes)
            finally:
                _unwrap(model)
        except Exception as exc:
            checks["chunked_prefill"] = _error(exc)
        # ---- preemption: a pool that holds the longest sequence but not the batch ----
        try:
            need = max(-(-(len(p) + MAX_NEW_TOKENS) // BLOCK_SIZE) for p in zoo.PROMPTS)
            hf_paged.wrap(model, None, num_blocks=need + 1, block_size=BLOCK_SIZE, max_num_batched_tokens=512)
            try:
                check = _compare_unpadded(_greedy(model, ids, mask), ref_greedy, fresh, ids, mask, result.notes)
                engine = hf_paged.get_engine(model) if result.status == "engine" else None
                if check.status == "ok" and engine is not None:
                    check.detail = f"{engine.scheduler.num_preemptions} preemptions"
                checks["preemption"] = check
            finally:
                _unwrap(model)
        except Exception as exc:
            checks["preemption"] = _error(exc)
        # ---- unwrap restores HF's generate ----
        try:
            leftovers = [k for k in ("generate", "_hf_paged") if k in model.__dict__]
            if leftovers:
                checks["unwrap"] = Check("error", f"unwrap left {leftovers} on the model")
            else:
                checks["unwrap"] = _compare(_greedy(model, ids, mask), ref_greedy)
        except Exception as exc:
            checks["unwrap"] = _error(exc)

    # ---- PagedCache in plain HF generate, on a never-wrapped copy ----
    try:
        cache = hf_paged.PagedCache(fresh)
    except ValueError as exc:
        checks["paged_cache"] = Check("refused", " ".join(str(exc).split())[:300])
    except Exception as exc:
        checks["paged_cache"] = _error(exc)
    else:
        try:
            checks["paged_cache"] = _compare(_greedy(fresh, ids, mask, past_key_values=cache), ref_greedy)
        except Exception as exc:
            checks["paged_cache"] = _error(exc)
        finally:
            cache.free()


def check_all(model_types: list[str] | None = None, progress: Callable[[Result], None] | None = None) -> list[Result]:
    """``check_architecture`` for each model type (default: the whole zoo), in order."""
    results = []
    for model_type in model_types or zoo.ARCHITECTURES:
        result = check_architecture(model_type)
        results.append(result)
        if progress is not None:
            progress(result)
    return results
