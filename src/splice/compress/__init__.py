"""Compression: PARA's post-training rank allocation for trained adapters, and JACTUS's joint
compression of the base weights with adaptation inside the kept subspaces.

    import splice
    result = splice.compress("my-adapter", budget=0.25, out="my-adapter-25")   # PARA, data-free

    from splice.compress import jactus
    report = jactus(model, calibration_batches, budget=0.8)                   # JACTUS

`splice.compress(...)` is PARA's `compress` (the name the API promises), and `splice.compress`
is still this package (`import splice.compress.jactus` works): the package module is callable.
"""

import sys
import types

from splice.compress.factorized import FactorizedLinear, load_factorized, save_factorized
from splice.compress.jactus import JactusReport, calibrate, jactus
from splice.compress.para import CompressionResult, compress, plot_sweep, sweep

__all__ = [
    "CompressionResult", "FactorizedLinear", "JactusReport", "calibrate", "compress", "jactus", "load_factorized",
    "plot_sweep", "save_factorized", "sweep",
]


class _CallablePackage(types.ModuleType):
    """This package, callable as PARA's `compress` (see the module doc)."""

    def __call__(self, *args, **kwargs) -> CompressionResult:
        return compress(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
