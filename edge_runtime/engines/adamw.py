"""torch's gradient clipping and AdamW step in numpy, for the engines that take the step themselves.

Both ONNX Runtime engines get the loss and the gradients from ONNX Runtime and update the module
here, with torch's arithmetic in float32, so they follow the torch engine step for step.
"""

from __future__ import annotations

import math

import numpy as np

# torch.optim.AdamW's defaults and the torch engine's clipping norm
BETAS = (0.9, 0.999)
EPS = 1e-8
CLIP_NORM = 1.0


def adamw_step(
    values: dict[str, np.ndarray],
    grads: dict[str, np.ndarray],
    m: dict[str, np.ndarray],
    v: dict[str, np.ndarray],
    rates: dict[str, float],
    t: int,
    weight_decay: float,
) -> dict[str, np.ndarray]:
    """torch's ``clip_grad_norm_(.., 1.0)`` then ``AdamW`` step ``t`` of every tensor in ``grads``.

    Updates the moments ``m`` and ``v`` in place and returns the new values (new arrays; ``values``
    is left as it was).
    """
    norm = math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads.values()))
    coef = min(1.0, CLIP_NORM / (norm + 1e-6))
    b1, b2 = BETAS
    correction1 = 1.0 - b1**t
    correction2_sqrt = math.sqrt(1.0 - b2**t)
    stepped = {}
    for name, grad in grads.items():
        g = grad * np.float32(coef) if coef < 1.0 else grad
        p = values[name].copy()
        rate = rates[name]
        if weight_decay:
            p *= np.float32(1.0 - rate * weight_decay)
        m[name] = m[name] * np.float32(b1) + g * np.float32(1.0 - b1)
        v[name] = v[name] * np.float32(b2) + (g * g) * np.float32(1.0 - b2)
        denom = np.sqrt(v[name]) / np.float32(correction2_sqrt) + np.float32(EPS)
        p -= np.float32(rate / correction1) * m[name] / denom
        stepped[name] = p
    return stepped
