"""The one registry of what hf_paged puts on transformers' classes, so that each patch is removed exactly.

``install(owner, name, value)`` sets a class attribute and remembers what was there (a patch over a patch keeps the
first original); ``remove(owner, name)`` puts it back only if the attribute is still hf_paged's (someone else's later
patch is left alone). Per-model and per-forward changes are not here: ``wrap`` keeps its own (an instance's
``generate``), and an engine's runner installs its forwards only for the length of each forward.
"""

from __future__ import annotations

import threading
from typing import Any

_lock = threading.Lock()
_patches: dict[tuple[type, str], tuple[Any, Any]] = {}  # (owner, name) -> (original in __dict__, hf_paged's value)
_MISSING = object()


def install(owner: type, name: str, value: Any) -> None:
    with _lock:
        original = _patches[(owner, name)][0] if (owner, name) in _patches else owner.__dict__.get(name, _MISSING)
        setattr(owner, name, value)
        _patches[(owner, name)] = (original, value)


def remove(owner: type, name: str) -> None:
    with _lock:
        entry = _patches.pop((owner, name), None)
        if entry is None or owner.__dict__.get(name) is not entry[1]:
            return
        if entry[0] is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, entry[0])


def installed(owner: type, name: str) -> bool:
    with _lock:
        return (owner, name) in _patches and owner.__dict__.get(name) is _patches[(owner, name)][1]


def original(owner: type, name: str) -> Any:
    """What ``owner.name`` was before hf_paged's patch (its current value when there is none)."""
    with _lock:
        entry = _patches.get((owner, name))
        return owner.__dict__.get(name) if entry is None else entry[0]
