"""Numerical helpers shared by the parity tests."""

import numpy as np


def relative_error(a, b) -> float:
    """||a - b||₂ / ||b||₂, computed in float64 so the metric adds no rounding of its own."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
