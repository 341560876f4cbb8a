"""Start-up without `torch._dynamo`, for the command-line process only.

Every `torch.optim` optimizer imports `torch._dynamo` on its first use (its methods are wrapped in
`torch._disable_dynamo` and its `step` calls `torch._dynamo.graph_break()`), which costs ~1.3 s here: more than
the seed's whole training loop. Outside torch.compile those wrappers are pass-throughs, so a process that never
compiles can skip them. `skip_dynamo_wrappers()` does that, and only while `torch._dynamo` is not yet loaded:

- the `_disable_dynamo` wrappers on Optimizer methods get the cache they would fill on first call (the plain
  function, which is what `torch._dynamo.disable` runs when nothing is compiling);
- each optimizer class's `step` runs with gradients off as `_use_grad_for_differentiable` does, minus the
  graph breaks. Step hooks and the profiler still apply (torch wraps this step in `profile_hook_step`).

The arithmetic is untouched: tests compare the curves with the seed's DataLoader loop bit for bit. Library users
(notebooks, other programs) never get this patch; they pay torch's own import cost.
"""

from __future__ import annotations

import functools
import sys

_applied = False


def skip_dynamo_wrappers() -> bool:
    """Apply the patch once; returns whether it is in effect."""
    global _applied
    if _applied:
        return True
    if "torch._dynamo" in sys.modules:
        return False  # already paid for: nothing to save, and compiled code may rely on the wrappers
    import torch  # on use: process.configure calls this before any command has imported torch
    from torch.optim import SGD, Adam, AdamW, Optimizer, RMSprop

    for name in ("add_param_group", "zero_grad", "state_dict", "load_state_dict"):
        plain = getattr(getattr(Optimizer, name), "__wrapped__", None)
        if plain is None:
            return False
        setattr(plain, "__dynamo_disable", plain)
    for cls in (Adam, AdamW, SGD, RMSprop):
        step = cls.__dict__.get("step")
        plain = getattr(step, "__wrapped__", None)
        if plain is None or getattr(step, "hooked", False):
            continue
        cls.step = _grad_off_step(plain, torch)
    _applied = True
    return True


def _grad_off_step(plain, torch):
    @functools.wraps(plain)
    def step(self, *args, **kwargs):
        previous = torch.is_grad_enabled()
        try:
            torch.set_grad_enabled(self.defaults["differentiable"])
            return plain(self, *args, **kwargs)
        finally:
            torch.set_grad_enabled(previous)

    return step
