"""How leased trials train: one small contract, two engines.

An engine takes a batch of jobs (a leased trial and its config) and trains them, checking the stop flag after every
epoch, calling `on_epoch(job, record)` (when given) after every epoch of every job (a returned reason stops that
job: its pruner's decision), and leaving a finished `RunResult` on each job. Both engines decide a History's best
epoch and its end by the same rules (`History.record`/`History.stop` in loop.py; the vectorized engine applies them
to all members at once), so a History means the same whichever engine made it; the recorder (recorder.Recorder)
writes it either way.

`settle(sweep)` decides which engine a sweep runs on (`engine: auto`: the vectorized engine when it supports every
probe trial of the sweep, else the reference loop, and why, a user's model probed as training runs it) and checks
each probe against the engine and the device.

- `ReferenceEngine`: the core loop (experiment.run_experiment), a batch of one. Its runs are live: the run exists
  in MLflow while the trial trains, and long trials stream their curves.
- `VectorizedEngine`: the whole batch stacked into one model per shape: the MLP by hand-written batched matmuls
  (vectorized.py), a user's model by torch.func (stacked.py; a model the probe finds it cannot train exactly,
  one whose stacked training fails anyway, and a group of one train on the reference loop, each trial failing
  there on its own with its FAILED run). Its runs are written once trained, inline or by writer processes
  (writers.py).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

import torch

from .config import ConfigError, ExperimentConfig, Sweep, SweepSpec
from .experiment import RunResult, resolve_device, run_experiment
from .loop import EpochRecord
from .stacked import stack_failure, stack_problem, train_func_group
from .stop import stop_flag
from .vectorized import check_supported, group_members, model_key, prepare_member, train_group

# Batches after TPE's random start-up: it learns between them. Ten keeps the search as good as one trial at a time
# on the default sweep (10 trials after the start-up go one by one; bench_auto_search.py), and a 1,000-trial
# sweep still trains 99 trials per batch.
LEARNING_ROUNDS = 10


@dataclass
class Job:
    """One leased trial on its way through an engine: what to train, and what training left."""

    lease: object  # ledger.Lease
    config: ExperimentConfig
    run: object | None = None  # recorder.TrialRun, when the engine's runs are live
    result: RunResult | None = None
    error: Exception | None = None  # why this job failed, when the others of its batch trained
    started: float = field(default_factory=time.time)


# Called after each epoch of each job; a returned reason stops that job (a pruner's decision).
EpochHook = Callable[[Job, EpochRecord], Optional[str]]


class Engine(Protocol):
    name: str
    live: bool  # whether a job's MLflow run exists while it trains (else it is written once trained)

    def batch_size(self, spec: SweepSpec, asked: int, n_trials: int) -> int:
        """How many trials to lease for the next batch, `asked` having been leased so far."""

    def train(self, jobs: list[Job], on_epoch: EpochHook | None) -> None:
        """Train every job, leaving its result on it. An exception fails the jobs left without one."""


class ReferenceEngine:
    name, live = "reference", True

    def batch_size(self, spec: SweepSpec, asked: int, n_trials: int) -> int:
        return 1

    def train(self, jobs: list[Job], on_epoch: EpochHook | None) -> None:
        def callback(job: Job, record: EpochRecord) -> str | None:
            stop_flag.check()
            return on_epoch(job, record) if on_epoch is not None else None

        for job in jobs:
            job.result = run_experiment(job.config, callbacks=[lambda record, job=job: callback(job, record)])


def learns(spec: SweepSpec) -> bool:
    """Whether the sampler proposes from earlier results (TPE) rather than independently (random, grid)."""
    return spec.sampler.type == "tpe"


class VectorizedEngine:
    name, live = "vectorized", False

    def batch_size(self, spec: SweepSpec, asked: int, n_trials: int) -> int:
        """A sampler that learns must see results between batches, or a batch of 256 asked at once is a random
        search: TPE's random start-up trials go in one batch, the rest of the budget in LEARNING_ROUNDS batches.
        Random and grid samplers learn nothing: as many as batch_trials allows."""
        if not learns(spec):
            return spec.batch_trials
        startup = spec.sampler.n_startup_trials
        if asked < startup:
            return min(spec.batch_trials, startup - asked)
        return min(spec.batch_trials, max(1, math.ceil((n_trials - startup) / LEARNING_ROUNDS)))

    def train(self, jobs: list[Job], on_epoch: EpochHook | None) -> None:
        shared: dict = {}  # the batch's distinct data sets, initial weights and generators, each made once
        members = [prepare_member(job, job.config, shared) for job in jobs]
        hook = None if on_epoch is None else lambda member, record: on_epoch(member.key, record)
        alone: list = []  # members the stacked engine cannot train, or gains nothing from: the reference loop
        for group in group_members(members):  # no hook: nothing runs per member per epoch
            if group[0].spec.class_path is None:
                train_group(group, on_epoch=hook, each_epoch=stop_flag.check)
                continue
            problem = self.problem(group[0])
            if problem is None and len(group) > 1:
                try:
                    train_func_group(group, on_epoch=hook, each_epoch=stop_flag.check)
                    continue
                except Exception as exc:  # what the probe did not meet: the reference loop is never worse
                    problem = stack_failure(group[0], exc)
                    VectorizedEngine.problems[model_key(group[0])] = problem
            if problem is not None:  # a member alone gains nothing from vmap (TPE's one-trial rounds)
                self.say(f"engine: {problem}; its trials train on the reference loop")
            alone += group
        alone_ids = {id(m) for m in alone}  # by identity: Members hold tensors, which `==` cannot compare
        for member in members:
            job = member.key
            job.started = member.started
            if id(member) in alone_ids:
                try:
                    ReferenceEngine().train([job], on_epoch)
                except Exception as exc:  # this job's own failure: the others of the batch still train
                    job.error = exc
            else:
                job.result = RunResult(member.config, member.dataset, member.spec, None, member.history, None, None)

    said: set = set()
    problems: dict = {}  # model_key -> why the stacked engine cannot train it (None: it can), found once per process

    @staticmethod
    def problem(member) -> str | None:
        key = model_key(member)
        if key not in VectorizedEngine.problems:
            VectorizedEngine.problems[key] = stack_problem(member)
        return VectorizedEngine.problems[key]

    @staticmethod
    def say(line: str) -> None:
        """Once per process: why a model's trials left the stacked engine."""
        if line not in VectorizedEngine.said:
            VectorizedEngine.said.add(line)
            print(line, file=sys.stderr, flush=True)


def engine_named(name: str) -> Engine:
    """The engine a settled sweep names (`auto` is resolved by `settle` first)."""
    engines = {"vectorized": VectorizedEngine, "reference": ReferenceEngine}
    if name not in engines:
        raise ValueError(f"engine {name!r}: the sweep must be settled first (engines.settle)")
    return engines[name]()


def settle(sweep: Sweep) -> Sweep:
    """The sweep as it will run: `engine: auto` resolved (`choose`), and every probe config (load_sweep's
    trials at the space's edges) checked runnable here, its device and the engine's support for it; a problem is
    one ConfigError naming the sweep file and the field that led to it. A settled sweep is returned as it is."""
    if sweep.spec.engine == "auto":
        engine, reason = choose([config for _, config in sweep.probes])
        sweep = dataclasses.replace(sweep, spec=sweep.spec.model_copy(update={"engine": engine}), engine_reason=reason)
    elif sweep.settled:
        return sweep
    for field_name, config in sweep.probes:
        try:
            check_runnable(config, sweep.spec.engine)
        except ConfigError as exc:  # `device: ...` or `engine: ...`, said of the field that led to it
            where = f"{field_name}: {str(exc).split(': ', 1)[1]}" if field_name else str(exc)
            raise ConfigError(f"{sweep.source}: {where}") from None
    return dataclasses.replace(sweep, settled=True)


def choose(configs: list[ExperimentConfig]) -> tuple[str, str]:
    """`engine: auto`: the vectorized engine when it supports every one of the sweep's probe configs, else the
    reference loop; and why, in a few words. A user's model is probed here as training would run it
    (stacked.stack_problem), so the one `engine:` line the sweep prints already says which trials leave it."""
    for config in configs:
        try:
            check_supported(config)
        except ConfigError as exc:
            return "reference", f"auto: {str(exc).split(': ', 1)[-1]}"
    problems = probe_user_models(configs)
    if not problems:
        return "vectorized", "auto: the vectorized engine supports every trial of this sweep"
    said = "; ".join(sorted(set(problems.values())))
    if len(problems) == len(configs):  # no probe stacks
        return "reference", f"auto: {said}"
    for problem in problems.values():  # said in the header: not again when its trials leave the stacked engine
        VectorizedEngine.said.add(f"engine: {problem}; its trials train on the reference loop")
    return "vectorized", f"auto: {said}; those trials train on the reference loop"


def probe_user_models(configs: list[ExperimentConfig]) -> dict:
    """{probe index: why the stacked engine cannot train it} for the probe configs with a user's model; torch's
    RNG is left as it was. A config that cannot even be prepared is left to experiment.check_sweep to explain."""
    problems, shared, state = {}, {}, torch.get_rng_state()
    try:
        for index, config in enumerate(configs):
            if config.model.class_path is None:
                continue
            try:
                member = prepare_member(None, config, shared)
            except Exception:
                continue
            problem = VectorizedEngine.problem(member)
            if problem is not None:
                problems[index] = problem
    finally:
        torch.set_rng_state(state)
    return problems


def check_runnable(config: ExperimentConfig, engine: str) -> None:
    """What a valid config still needs to run here: its device, and the engine's support for it (the engine
    says what it supports; config does not restate it)."""
    if config.device not in ("auto", "cpu"):
        resolve_device(config.device)
    if engine == "vectorized":
        check_supported(config)
