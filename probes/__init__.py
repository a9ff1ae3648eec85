"""Shared probing code: activations in (one nnsight adapter), fitted probes, subspaces and metrics out.

Only ``probes.activations`` knows that activations come from a model; everything else takes tensors.
"""

from .activations import (
    Edit,
    add_vector,
    generate_with_edits,
    logits_with_edits,
    model_dims,
    next_token_logits,
    project_out,
    replace_positions,
    residual_sites,
    residual_stream,
    site_layer,
)
from .io import check_compatible, load_probe, save_probe, site_kind
from .linear import (
    LinearProbe,
    fit_probe_report,
    fit_reduced_rank,
    fit_ridge,
    kfold_indices,
    population_probe_report,
    reduced_rank_curve,
    regression_metrics,
    split_indices,
)
from .subspaces import (
    effective_dim,
    fraction_in_subspace,
    orthonormal_basis,
    principal_angles,
    random_fraction_baseline,
    random_subspace,
    subspace_overlap,
)

__all__ = [
    "Edit",
    "LinearProbe",
    "add_vector",
    "check_compatible",
    "effective_dim",
    "fit_probe_report",
    "population_probe_report",
    "fit_reduced_rank",
    "fit_ridge",
    "fraction_in_subspace",
    "generate_with_edits",
    "kfold_indices",
    "load_probe",
    "logits_with_edits",
    "model_dims",
    "next_token_logits",
    "orthonormal_basis",
    "principal_angles",
    "project_out",
    "random_fraction_baseline",
    "random_subspace",
    "reduced_rank_curve",
    "regression_metrics",
    "replace_positions",
    "residual_sites",
    "residual_stream",
    "save_probe",
    "site_kind",
    "site_layer",
    "split_indices",
    "subspace_overlap",
]
