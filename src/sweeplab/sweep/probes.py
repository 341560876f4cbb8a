"""The checks before any store: a loaded sweep settled into the plan that runs it.

`settle` is called once per sweep, by whatever starts it (api.start_sweep for `sweeplab sweep` and
sweeplab.sweep, cli._worker for `sweeplab worker`), before any study or run
exists: it reads the data, builds the options and runs each distinct model on one batch for every probe config
(load_sweep's trials at the space's edges; train.experiment.check_probes), then resolves `engine: auto`
(train.engines.choose) and checks each probe against the engine and the device. Each problem is one ConfigError naming the sweep file and the field that led to
it. The driver (driver.py) takes the Plan it returns and never settles again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sweeplab.config import ConfigError
from sweeplab.sweep.spec import Sweep
from sweeplab.train.engines import Routes, check_runnable, choose
from sweeplab.train.experiment import check_probes


@dataclass(frozen=True)
class Plan:
    """A sweep as it will run: its engine decided (`sweep.spec.engine` is `vectorized` or `reference`) and every
    probe checked; `reason` says why `engine: auto` chose that engine ("" when the file named it); `routes`, where
    each configuration trains and why, decided once here and used by every engine the sweep builds."""

    sweep: Sweep
    reason: str = ""
    routes: Routes = dataclasses.field(default_factory=Routes, compare=False)


def settle(sweep: Sweep) -> Plan:
    """The plan for a loaded sweep (see the module's docstring); raises ConfigError."""
    reason, routes = "", Routes()
    check_probes(sweep.probes, sweep.source)  # bad data, a bad model or option: before `auto` probes them
    if sweep.spec.engine == "auto":
        engine, reason = choose([config for _, config in sweep.probes], routes)
        sweep = dataclasses.replace(sweep, spec=sweep.spec.model_copy(update={"engine": engine}))
    for field_name, config in sweep.probes:
        try:
            check_runnable(config, sweep.spec.engine, routes)
        except ConfigError as exc:  # `device: ...` or `engine: ...`, said of the field that led to it
            where = f"{field_name}: {str(exc).split(': ', 1)[1]}" if field_name else str(exc)
            raise ConfigError(f"{sweep.source}: {where}") from None
    return Plan(sweep, reason, routes)
