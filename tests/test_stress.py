"""The stress grid: every divergence x kernel x hard case x dtype gives finite values and
gradients or a clear ValueError, never a silent NaN or inf."""

from __future__ import annotations

import itertools

import torch

from beyond_icon import icon_loss, kernels

DIVERGENCES = ["kl", "reverse_kl", "tv", "hellinger", "jsd", "chi2", "jeffreys", "alpha:0.5"]
KERNELS = ["gaussian", "student_t", "cosine"]
CASES = ["temperature 0.01", "norms 1e3", "norms 1e-6", "duplicates", "empty rows", "n = 2"]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _inputs(case: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    n = 2 if case == "n = 2" else 8
    z = torch.randn(n, 4, generator=g, dtype=torch.float64)
    labels = torch.arange(n) % 2
    if case == "norms 1e3":
        z = z * 1e3
    elif case == "norms 1e-6":
        z = z * 1e-6
    elif case == "duplicates":
        z[1] = z[0]
        z[3] = z[2]
    elif case == "empty rows":
        labels = torch.tensor([0, 0, 1, 1, 2, 3, 4, 4])  # classes 2 and 3 appear once
    elif case == "n = 2":
        labels = torch.tensor([0, 0])
    return z.to(dtype).requires_grad_(True), labels


def _one(divergence: str, kernel: str, case: str, dtype: torch.dtype) -> str:
    z, labels = _inputs(case, dtype)
    options = {"temperature": 0.01} if kernel == "cosine" and case == "temperature 0.01" else {}
    if kernel != "cosine" and case == "temperature 0.01":
        options = {"sigma": 0.01} if kernel == "gaussian" else {"dof": 0.01}
    try:
        log_q = getattr(kernels, kernel)(z, **options)
        log_p = kernels.labels(labels, dtype=log_q.dtype)
        loss = icon_loss(log_p, log_q, divergence)
        loss.backward()
    except ValueError:
        return "clear error"
    finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(z.grad).all())
    return "finite" if finite else "silent failure"


def test_stress_grid_has_no_silent_failure():
    outcomes: dict[str, list] = {"finite": [], "clear error": [], "silent failure": []}
    for case in itertools.product(DIVERGENCES, KERNELS, CASES, DTYPES):
        outcomes[_one(*case)].append(case)
    counts = {k: len(v) for k, v in outcomes.items()}
    assert sum(counts.values()) == len(DIVERGENCES) * len(KERNELS) * len(CASES) * len(DTYPES)
    assert counts["silent failure"] == 0, (counts, outcomes["silent failure"][:10])
    assert counts["finite"] > counts["clear error"], counts  # errors are the exception
    print(counts)
