"""Compression: PARA's post-training rank allocation for trained adapters, and JACTUS's joint
compression of the base weights with adaptation inside the kept subspaces.

    import splice
    result = splice.compress("my-adapter", budget=0.25, out="my-adapter-25")   # PARA, data-free

    from splice.compress import jactus
    report = jactus(model, calibration_batches, budget=0.8)                   # JACTUS
"""

from splice.compress.factorized import FactorizedLinear, load_factorized, save_factorized
from splice.compress.jactus import JactusReport, calibrate, jactus
from splice.compress.para import CompressionResult, compress, plot_sweep, sweep

__all__ = [
    "CompressionResult", "FactorizedLinear", "JactusReport", "calibrate", "compress", "jactus", "load_factorized",
    "plot_sweep", "save_factorized", "sweep",
]
