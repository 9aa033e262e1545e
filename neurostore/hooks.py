"""Forward hooks on named submodules, TransformerLens style: registered for one `with` block,
every handle removed in `finally` whatever happens inside.

    outs = {}
    with forward_hooks(model, {"layer3": keep(outs, "layer3")}, pre={"fc": keep(outs, "fc_in")}):
        model(x)                          # outs: layer3's output, fc's first input
    with forward_hooks(model, {"layer4": lambda out: out * 0}):
        model(x)                          # a returned tensor replaces the output (ablation)

A hook function gets the module's output (its first element when the module returns a tuple or
list, as attention blocks do; `whole=True` passes the output untouched) and may return a tensor to
replace it; the rest of a tuple output is kept. Every temporary hook in neurostore is registered
here; features.attach registers its own, which live as long as the target (not one block).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

Hook = Callable[[torch.Tensor], "torch.Tensor | None"]


def _output_hook(fn: Hook, whole: bool):
    def hook(_m, _inp, out):
        if whole or not isinstance(out, (tuple, list)):
            return fn(out)
        new = fn(out[0])
        if new is None:
            return None
        return (new, *out[1:]) if isinstance(out, tuple) else [new, *out[1:]]  # the rest as it was
    return hook


def _input_hook(fn: Hook):
    def hook(_m, inp):
        new = fn(inp[0])
        return None if new is None else (new, *inp[1:])
    return hook


def keep(into: dict, key) -> Hook:
    """A hook that stores what it sees as into[key], not detached (gradients can flow back to it)."""
    def hook(t: torch.Tensor) -> None:
        into[key] = t
    return hook


@contextlib.contextmanager
def forward_hooks(module: nn.Module, fwd: Mapping[str, Hook] | None = None, *,
                  pre: Mapping[str, Hook] | None = None, whole: bool = False) -> Iterator[None]:
    """Forward hooks `fwd` (name -> fn(output)) and forward pre-hooks `pre` (name -> fn(first
    input)) on the named submodules of `module` ('' is the module itself) for the block; a
    function's returned tensor replaces what it was given. Unknown names raise KeyError before
    anything is registered."""
    modules = dict(module.named_modules())
    fwd, pre = dict(fwd or {}), dict(pre or {})
    for name in [*fwd, *pre]:
        if name not in modules:
            raise KeyError(f"no module named {name!r} in {type(module).__name__}")
    handles = []
    try:
        for name, fn in fwd.items():
            handles.append(modules[name].register_forward_hook(_output_hook(fn, whole)))
        for name, fn in pre.items():
            handles.append(modules[name].register_forward_pre_hook(_input_hook(fn)))
        yield
    finally:
        for h in handles:
            h.remove()
