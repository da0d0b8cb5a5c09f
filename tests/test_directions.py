"""v_rev estimators and alignment: shape-checked arguments (the planted-direction checks are in test_analysis.py,
the round-off floor in test_roundoff_floor.py)."""

from __future__ import annotations

import pytest
import torch

from revlens import directions as dirs


def test_shape_checks_reject_mismatched_dimensions():
    with pytest.raises(TypeError, match="mu_align"):
        dirs.v_rev_mean_diff(torch.zeros(2, 4), torch.zeros(2, 5))
