"""Reconstruction error of a quantized weight: MSE, max |error| and SQNR, one rule for every caller.

``error_stats`` is the one place q4lab computes these numbers (``quantize_model(...,
keep_error_stats=True)``, ``q4lab.report``, the widgets). It accepts NumPy arrays or torch tensors
(a torch tensor is reduced on its own device, so a GPU weight is not copied to the host) and imports
neither torch nor anything else beyond NumPy.

SQNR (signal-to-quantization-noise ratio) is ``10 log10(sum w^2 / sum e^2)`` dB with ``e = w_hat -
w``, sums in float64. The two limits follow the formula, and this is the rule everywhere:
- ``sum e^2 == 0``: the reconstruction is exact, SQNR = ``+inf``. This includes an all-zero weight,
  which 4-bit storage always reproduces exactly (docs/format.md §5: an all-zero block decodes
  to +0.0).
- ``sum w^2 == 0 < sum e^2``: noise with no signal, SQNR = ``-inf``.
"""
from __future__ import annotations

import math

import numpy as np


def sqnr_db(signal_energy: float, noise_energy: float) -> float:
    """``10 log10(signal / noise)`` in dB with the limits above: ``+inf`` when ``noise == 0``
    (exact, whatever the signal), ``-inf`` when ``signal == 0 < noise``."""
    signal, noise = float(signal_energy), float(noise_energy)
    if signal < 0 or noise < 0 or math.isnan(signal) or math.isnan(noise):
        raise ValueError(f"energies must be sums of squares (>= 0), got signal={signal!r}, "
                         f"noise={noise!r}")
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def error_stats(weight, weight_hat) -> dict:
    """``{"mse", "max_abs_err", "sqnr_db"}`` of ``weight_hat`` against ``weight`` (same shape;
    NumPy arrays or torch tensors, any float dtype; values taken as float32 then summed in
    float64)."""
    if tuple(np.shape(weight)) != tuple(np.shape(weight_hat)):
        raise ValueError(f"shapes differ: weight {tuple(np.shape(weight))}, weight_hat "
                         f"{tuple(np.shape(weight_hat))}")
    if math.prod(np.shape(weight)) == 0:
        raise ValueError("cannot measure the error of an empty weight")
    if hasattr(weight, "detach") and hasattr(weight_hat, "detach"):  # torch: reduce on device
        w = weight.detach().float().double()
        e = weight_hat.detach().float().double().to(w.device) - w
        signal, noise, worst = float((w * w).sum()), float((e * e).sum()), float(e.abs().max())
        n = w.numel()
    else:
        w = _host_f64(weight)
        e = _host_f64(weight_hat) - w
        signal, noise, worst = float(np.sum(w * w)), float(np.sum(e * e)), float(np.max(np.abs(e)))
        n = w.size
    return {"mse": noise / n, "max_abs_err": worst, "sqnr_db": sqnr_db(signal, noise)}


def _host_f64(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().float().cpu().numpy()
    return np.asarray(a, dtype=np.float32).astype(np.float64)
