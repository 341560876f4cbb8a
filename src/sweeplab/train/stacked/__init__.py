"""The stacked engine: many trials of one shape trained as one, each member equal to its reference twin.

- epochs.py: the shared part: members (each set up as the reference loop sets up its trial), groups, the epoch
  loop and its curves (`fit_stacked`), members that end leaving the stack
- optim.py: the stacked optimizers (torch.optim's formulas over a [K, P] tensor) and each member's schedule
- loss.py: each member's loss, reduced as torch reduces it for one
- mlp.py: the seed's MLP, its forward written as batched matmuls (`train_group`)
- func.py: any other model, its forward by torch.func's functional_call + vmap (`train_func_group`), and the
  probe that says which models it cannot train exactly (`stack_problem`)
"""
