"""The contenders' names, apart from their code: settings check ``baselines=`` against these without
importing the learned inits."""
from __future__ import annotations

# One scheme for every layer (contenders/baselines.py); "lsuv" is orthogonal followed by LSUV.
TEXTBOOK_BASELINES: tuple[str, ...] = ("pytorch_default", "xavier", "he", "lecun", "orthogonal", "lsuv")
# Procedures that learn per-layer scales on data first (contenders/learned.py): sized for the proxies, and
# "_paper" at the papers' published settings (GradInit 390 iterations, MetaInit 500 steps).
LEARNED_BASELINES: tuple[str, ...] = ("gradinit", "metainit", "gradinit_paper", "metainit_paper")
# With pretrained=PATH: every layer from the file, or every layer but the last (a fresh PyTorch-default head).
PRETRAINED_BASELINES: tuple[str, ...] = ("checkpoint", "checkpoint_fresh_head")
ALL_BASELINES: tuple[str, ...] = (*TEXTBOOK_BASELINES, *LEARNED_BASELINES, *PRETRAINED_BASELINES)


def learned_method(baseline: str) -> str:
    """The method a learned baseline runs: ``gradinit`` or ``metainit`` (``gradinit_paper`` runs GradInit)."""
    return baseline.split("_", 1)[0]
