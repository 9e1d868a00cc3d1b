"""Looking at adapters after the fact: spectra of their weight changes, subspace angles, forgetting."""

from splice.analysis.angles import min_principal_angle, orthonormal_basis, principal_angles
from splice.analysis.compare import (
    AdapterComparison,
    ModuleComparison,
    compare_adapter_dirs,
    compare_adapters,
    compare_deltas,
)
from splice.analysis.forgetting import (
    ForgettingLaw,
    SubspaceAngle,
    accuracy_matrix,
    fit_forgetting_law,
    forgetting,
    gradient_subspace,
    subspace_angle,
)
from splice.analysis.spectra import (
    ModuleSpectrum,
    SpectraReport,
    adapter_dir_spectra,
    adapter_spectra,
    delta_matrix,
    energy_rank,
    entropy_rank,
    plot_effective_ranks,
    plot_spectra,
    singular_values,
    stable_rank,
)

__all__ = [
    "AdapterComparison", "ForgettingLaw", "ModuleComparison", "ModuleSpectrum", "SpectraReport", "SubspaceAngle",
    "accuracy_matrix", "adapter_dir_spectra", "fit_forgetting_law", "forgetting", "gradient_subspace",
    "subspace_angle",
    "adapter_spectra", "compare_adapter_dirs", "compare_adapters", "compare_deltas", "delta_matrix",
    "energy_rank", "entropy_rank", "min_principal_angle", "orthonormal_basis", "plot_effective_ranks",
    "plot_spectra", "principal_angles", "singular_values", "stable_rank",
]
