"""Compression: PARA's post-training rank allocation for trained adapters, and JACTUS's joint
compression of the base weights with adaptation inside the kept subspaces.

    import splice
    result = splice.compress("my-adapter", budget=0.25, out="my-adapter-25")   # PARA, data-free

    from splice.compression import jactus
    report = jactus(model, calibration_batches, budget=0.8)                   # JACTUS

`splice.compress` is PARA's `compress` (the name the API promises); this package is
`splice.compression`, so the function never shadows it.
"""

from splice.compression.factorized import FactorizedLinear, load_factorized, save_factorized
from splice.compression.jactus import JactusReport, calibrate, jactus
from splice.compression.para import CompressionResult, compress, plot_sweep, sweep

__all__ = [
    "CompressionResult", "FactorizedLinear", "JactusReport", "calibrate", "compress", "jactus", "load_factorized",
    "plot_sweep", "save_factorized", "sweep",
]
