"""The one training loop of the probe world's models (targets and encoder): AdamW with one-cycle
warm-up and cosine decay, batches from a seeded permutation, so training is reproducible."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def n_steps(epochs: float, n: int, batch_size: int) -> int:
    """Optimiser steps of a training run: `epochs` may be fractional, at least one step."""
    return max(1, int(round(epochs * n / batch_size)))


def fit(params: Sequence[torch.nn.Parameter], n: int, batch_loss: Callable[[torch.Tensor], torch.Tensor], *,
        epochs: float, lr: float, seed: int, batch_size: int, weight_decay: float,
        on_step: Callable[[int], None] | None = None) -> None:
    """Minimise batch_loss(indices) over n examples. `epochs` may be fractional (the step count is
    what matters). The caller puts its modules in train mode first and in eval mode after."""
    steps = n_steps(epochs, n, batch_size)
    opt = torch.optim.AdamW(list(params), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    g = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(n, generator=g), 0
    for _ in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        loss = batch_loss(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if on_step:
            on_step(1)
