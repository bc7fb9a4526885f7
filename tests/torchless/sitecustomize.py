"""Started by Python itself when this directory is on PYTHONPATH: the process then behaves as on a machine
where torch and transformers were never installed, so a test (or the notebook's kernel) run this way proves that
a code path does not need them. ``import torch`` raises ModuleNotFoundError, and ``importlib.util.find_spec``
answers None, as it would without the packages."""

import importlib.abc
import importlib.util
import sys

BLOCKED = ("torch", "transformers")


def _blocked(name: str) -> bool:
    return name.split(".", 1)[0] in BLOCKED


class _NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if _blocked(fullname):
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked by tests/torchless)", name=fullname)
        return None


_find_spec = importlib.util.find_spec


def _find_spec_unless_blocked(name, package=None):
    full = importlib.util.resolve_name(name, package) if name.startswith(".") else name
    return None if _blocked(full) else _find_spec(name, package)


for _name in [m for m in sys.modules if _blocked(m)]:  # nothing should have loaded them this early
    del sys.modules[_name]
sys.meta_path.insert(0, _NotInstalled())
importlib.util.find_spec = _find_spec_unless_blocked
