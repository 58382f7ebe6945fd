"""Training: the recipes (sft, dpo, zo) and what they share. The package itself is callable, so that
`vlmfit.train(recipe, ...)` is the Python API of `vlmfit train` (train/api.py) while `vlmfit.train.sft` stays the
package's module: a function named `train` on the root package would be replaced by this subpackage as soon as
any of its modules is imported."""

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from vlmfit.train.api import train

        return train(*args, **kwargs)

    __call__.__doc__ = "vlmfit.train(recipe, overrides=None, *, resume=None, overwrite=False, force=False, profile=False)"


sys.modules[__name__].__class__ = _CallablePackage
