"""Evaluation: task metrics, classification, captions, preference, predict, and `vlmfit eval` (eval.py with its
cache). The package itself is callable: `vlmfit.evaluate(target, ...)` is `vlmfit eval` (evaluate/api.py), while
`vlmfit.evaluate.eval` stays the package's module (the same reason as vlmfit.train)."""

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from vlmfit.evaluate.api import evaluate

        return evaluate(*args, **kwargs)

    __call__.__doc__ = "vlmfit.evaluate(target, overrides=None, *, use_cache=True, console=None) -> dict"


sys.modules[__name__].__class__ = _CallablePackage
