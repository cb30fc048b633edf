"""Helpers shared by the memory tests: gradients of a tiny model under a given setup."""
from __future__ import annotations

import torch


def trainable_grads(model) -> dict[str, torch.Tensor]:
    """Detached copies of every trainable parameter's gradient, keyed by name."""
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def assert_grads_close(actual: dict, expected: dict, atol=1e-5, rtol=1e-5):
    assert actual.keys() == expected.keys(), sorted(set(actual) ^ set(expected))
    assert expected, "no gradients to compare"
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=atol, rtol=rtol, msg=name)
