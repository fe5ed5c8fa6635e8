"""Tent's entropy and RMT's symmetric CE round exactly as the reference code does.

The transcriptions below are the official code's formulas (spec ``tta.md`` sections 2 and 4.3):
Tent's ``softmax_entropy(x) = -(x.softmax(1) * x.log_softmax(1)).sum(1)`` (github.com/DequanWang/
tent, ``tent.py``; the loss is its ``.mean(0)``) and the benchmark's
``SymmetricCrossEntropy(alpha=0.5)`` (github.com/mariodoebler/test-time-adaptation,
``utils/losses.py``; RMT takes the batch mean). Mathematically equal forms (``exp(log_softmax)``
for ``softmax``) differ by a few ulps, and over adaptation steps the difference compounds, so
kdzoo's functions must be *bit-identical* (``torch.equal``), values and gradients.
"""

from __future__ import annotations

import pytest
import torch

from kdzoo.losses.functional import softmax_entropy, symmetric_cross_entropy


def reference_entropy(x: torch.Tensor) -> torch.Tensor:
    return -(x.softmax(1) * x.log_softmax(1)).sum(1)


def reference_sce(x: torch.Tensor, x_ema: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    return -(1 - alpha) * (x_ema.softmax(1) * x.log_softmax(1)).sum(1) - alpha * (
        x.softmax(1) * x_ema.log_softmax(1)
    ).sum(1)


def logits(seed: int, n: int, c: int, scale: float) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, c, generator=generator, dtype=torch.float32)


CASES = [(0, 200, 10, 1.0), (1, 64, 1000, 3.0), (2, 7, 100, 10.0), (3, 1, 2, 0.1)]


@pytest.mark.parametrize(("seed", "n", "c", "scale"), CASES)
def test_softmax_entropy_is_bit_identical_to_tent(seed, n, c, scale):
    x = logits(seed, n, c, scale).requires_grad_(True)
    ours = softmax_entropy(x)
    (grad,) = torch.autograd.grad(ours, x)
    y = x.detach().clone().requires_grad_(True)
    theirs = reference_entropy(y).mean(0)
    (reference_grad,) = torch.autograd.grad(theirs, y)
    assert torch.equal(ours, theirs)
    assert torch.equal(grad, reference_grad)


@pytest.mark.parametrize(("seed", "n", "c", "scale"), CASES)
def test_symmetric_cross_entropy_is_bit_identical_to_the_benchmark(seed, n, c, scale):
    x = logits(seed, n, c, scale).requires_grad_(True)
    x_ema = logits(seed + 100, n, c, scale)
    ours = symmetric_cross_entropy(x, x_ema)
    (grad,) = torch.autograd.grad(ours, x)
    y = x.detach().clone().requires_grad_(True)
    theirs = reference_sce(y, x_ema).mean(0)
    (reference_grad,) = torch.autograd.grad(theirs, y)
    assert torch.equal(ours, theirs)
    assert torch.equal(grad, reference_grad)


def test_tent_style_adam_steps_stay_bit_identical():
    """25 Adam steps of entropy minimisation of a linear model (Tent's loop, in miniature)
    give the same weights and logits with kdzoo's entropy and with the reference's."""

    def run(loss_fn) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Linear(32, 10)
        inputs = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(25):
            loss = loss_fn(model(inputs))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            return model.weight.clone(), model(inputs)

    ours = run(softmax_entropy)
    theirs = run(lambda z: reference_entropy(z).mean(0))
    assert torch.equal(ours[0], theirs[0])
    assert torch.equal(ours[1], theirs[1])
