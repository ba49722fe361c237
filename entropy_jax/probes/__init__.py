"""Probe metrics: pure functions on arrays, definitions in ``docs/metrics.md``.

``from entropy_jax import probes``; e.g. ``probes.spectral_metrics(x, mesh=mesh)`` for all
representation-spectrum probes from one sharded pass over x. One module per probe family.
"""

from entropy_jax.probes.alpha_req import AlphaReqResult, alpha_req, alpha_req_from_spectrum, default_alpha_window
from entropy_jax.probes.attention import (
    attention_entropy,
    attention_entropy_blocked,
    attention_entropy_bounds,
    attention_entropy_lower_bound,
    causal_mask,
    head_entropy_bins,
    predictive_entropy,
    row_entropy,
)
from entropy_jax.probes.diffusion import (
    diffusion_eigenvalues,
    diffusion_spectral_entropy,
    diffusion_spectral_mutual_information,
    dse_from_eigenvalues,
    gaussian_kernel,
)
from entropy_jax.probes.spectra import (
    covariance_spectrum,
    rankme,
    rankme_cov,
    spectral_metrics,
    von_neumann_entropy,
)
from entropy_jax.probes.stats import ScatterStats, gram_eigenvalues, scatter_stats
from entropy_jax.probes.weights import MatrixSpectrum, matrix_spectrum, weight_spectra

__all__ = [
    "AlphaReqResult",
    "MatrixSpectrum",
    "ScatterStats",
    "alpha_req",
    "alpha_req_from_spectrum",
    "attention_entropy",
    "attention_entropy_blocked",
    "attention_entropy_bounds",
    "attention_entropy_lower_bound",
    "causal_mask",
    "covariance_spectrum",
    "default_alpha_window",
    "diffusion_eigenvalues",
    "diffusion_spectral_entropy",
    "diffusion_spectral_mutual_information",
    "dse_from_eigenvalues",
    "gaussian_kernel",
    "gram_eigenvalues",
    "head_entropy_bins",
    "matrix_spectrum",
    "predictive_entropy",
    "rankme",
    "rankme_cov",
    "row_entropy",
    "scatter_stats",
    "spectral_metrics",
    "von_neumann_entropy",
    "weight_spectra",
]
