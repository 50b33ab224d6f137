"""ewc_fast inside other training frameworks, and files that keep importances with their meaning.

Optional: nothing here is imported by ``import ewc_fast``, and each submodule imports its framework
only when it is itself imported (``docs/INTEGRATIONS.md``):

* :mod:`.files` -- importance and EWC/SI/WVA state files (safetensors + metadata; extra ``files``).
* :mod:`.hf` -- :class:`~.hf.ConsolidationCallback` for the Hugging Face ``Trainer`` (extra ``hf``).
* :mod:`.lightning` -- :class:`~.lightning.ConsolidationCallback` for Lightning (extra ``lightning``).
* :mod:`.avalanche` -- Avalanche plugins replacing its EWC / SI / MAS plugins (extra ``avalanche``).
* :mod:`.common` -- what the three share: the penalty step, task-end estimation, state bundles.

The file functions are also reachable from here (``ewc_fast.integrations.save_importance``), loaded
on first use.
"""

from __future__ import annotations

import importlib

_FILES = ("save_importance", "load_importance", "save_state", "load_state", "read_metadata", "fingerprint")

__all__ = list(_FILES)


def __getattr__(name: str):
    if name in _FILES:
        return getattr(importlib.import_module(".files", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
