"""Tolerances from the dtype's rounding, not from one machine's result.

Two float32 computations of the same quantity that sum in a different order (another CPU's SIMD
width, a merged vs unmerged matmul, a batch split in pieces) agree to a few units of float32's
machine epsilon times the size of the terms they add: not times the result, which can be far
smaller (a KL of 4e-4 is a difference of log-probs of ~6). `ulps` allows for the depth of the
computation (a few layers, a softmax, a sum over a few hundred tokens).
"""

import torch

EPS32 = torch.finfo(torch.float32).eps  # 1.19e-7


def fp32_atol(magnitude: float, ulps: int = 64) -> float:
    """Absolute tolerance for float32 results built from terms of size `magnitude`."""
    return ulps * EPS32 * float(magnitude)


def assert_fp32_close(actual, expected, magnitude: float, ulps: int = 64) -> None:
    """Tensors (or floats, or dicts of floats) equal within `fp32_atol(magnitude, ulps)`."""
    tol = fp32_atol(magnitude, ulps)
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for k in expected:
            assert abs(actual[k] - expected[k]) <= tol, (k, actual[k], expected[k], tol)
        return
    torch.testing.assert_close(torch.as_tensor(actual), torch.as_tensor(expected), rtol=0, atol=tol)
