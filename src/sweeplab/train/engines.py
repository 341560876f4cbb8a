"""How leased trials train: one small contract, two engines.

An engine takes a batch of jobs (a leased trial and its config) and trains them, checking the stop flag after every
epoch, calling `on_epoch(job, record)` (when given) after every epoch of every job (a returned reason stops that
job: its pruner's decision), and leaving a finished `RunResult` on each job. Both engines decide a History's best
epoch and its end by one set of rules (epoch.Curves: the stacked engine for K members, the reference loop at
K = 1), so a History means the same whichever engine made it; the recorder (recorder.Recorder) writes it either
way.

`choose(configs)` is `engine: auto`'s decision (the vectorized engine when it supports every one of a sweep's probe
configs, else the reference loop, and why, a user's model probed as training runs it); `check_runnable` checks a
config against an engine and the device. The sweep decides how many jobs a batch holds (sweeplab.sweep.batching).

- `ReferenceEngine`: the core loop (experiment.run_experiment), a batch of one. Its runs are live: the run exists
  in MLflow while the trial trains, and long trials stream their curves.
- `VectorizedEngine`: the whole batch stacked into one model per shape: the MLP by hand-written batched matmuls
  (stacked/mlp.py), a user's model by torch.func (stacked/func.py; a model the probe finds it cannot train exactly,
  one whose stacked training fails anyway, and a group of one train on the reference loop, each trial failing
  there on its own with its FAILED run). Its runs are written once trained, inline or by writer processes
  (sweep/writers.py).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

import torch

from sweeplab.config import ConfigError, ExperimentConfig
from sweeplab.stop import stop_flag
from sweeplab.train.epoch import EpochRecord
from sweeplab.train.experiment import Trained, resolve_device, run_experiment
from sweeplab.train.stacked.epochs import (
    check_supported,
    data_problem,
    group_members,
    model_key,
    prepare_member,
)
from sweeplab.train.stacked.func import stack_failure, stack_problem, train_func_group
from sweeplab.train.stacked.mlp import train_group


@dataclass
class Job:
    """One leased trial on its way through an engine: what to train, and what training left."""

    lease: object  # ledger.Lease
    config: ExperimentConfig
    run: object | None = None  # track.recorder.TrialRun, when the engine's runs are live
    result: Trained | None = None
    error: Exception | None = None  # why this job failed, when the others of its batch trained
    started: float = field(default_factory=time.time)


# Called after each epoch of each job; a returned reason stops that job (a pruner's decision).
EpochHook = Callable[[Job, EpochRecord], Optional[str]]


class Engine(Protocol):
    """Jobs in, trained results out. The sweep driver (sweep.driver.work) is its only caller."""

    name: str
    live: bool  # whether a job's MLflow run exists while it trains (else it is written once trained)
    stacks: bool  # whether a batch of jobs trains together (so a bigger batch is faster), or one job after another

    def train(self, jobs: list[Job], on_epoch: EpochHook | None) -> None:
        """Train every job, leaving a `Trained` (its History) on `job.result`, or its own failure on `job.error`.

        Called with jobs whose trials are leased (and, for a live engine, whose runs are begun: `job.run`); each
        `job.config` is valid and passed `check_runnable` for this engine. It may assume it is the only code
        training in this process. It must check `stop_flag` at least once per epoch (raising Stopped leaves the
        unfinished jobs to the caller to fail), call `on_epoch(job, record)` after every epoch of every job when
        given (a returned reason stops that job: its pruner's decision), and must not touch MLflow or Optuna: the
        caller writes each result. An exception out of `train` fails every job left without a result."""


class ReferenceEngine:
    name, live, stacks = "reference", True, False

    def train(self, jobs: list[Job], on_epoch: EpochHook | None) -> None:
        def callback(job: Job, record: EpochRecord) -> str | None:
            stop_flag.check()
            return on_epoch(job, record) if on_epoch is not None else None

        for job in jobs:
            job.result = run_experiment(job.config, callbacks=[lambda record, job=job: callback(job, record)])


class Routes:
    """One sweep's decisions on where its configurations train, each taken once: whether the stacked engine supports
    a config (None, or why not), why a model cannot stack (by stacked.epochs.model_key: a probe's torch.func trial,
    or a failure met in training), and the lines already said about them. `probes.settle` makes one per sweep and
    the plan carries it to every engine the sweep builds (nothing per sweep lives on a class: two sweeps in one
    notebook decide afresh)."""

    def __init__(self) -> None:
        self.configs: dict = {}  # (config, code folder) -> None or why the stacked engine cannot train it
        self.models: dict = {}  # model_key -> None or why its trials cannot stack
        self.said: set[str] = set()

    def config_problem(self, config: ExperimentConfig) -> str | None:
        key = (config.model_dump_json(), config.code_dir)
        if key not in self.configs:
            try:
                check_supported(config)
                self.configs[key] = None
            except ConfigError as exc:
                self.configs[key] = str(exc)
        return self.configs[key]

    def check(self, config: ExperimentConfig) -> None:
        """Raises ConfigError when the stacked engine cannot train the config (check_supported's line)."""
        problem = self.config_problem(config)
        if problem is not None:
            raise ConfigError(problem)

    def model_problem(self, member) -> str | None:
        # a freeze holds BatchNorm, and a Dropout at a rate above 0 is swapped (stacked.func): each another answer
        dropping = tuple(sorted(name for name, rate in member.dropout_rates.items() if rate > 0))
        key = (model_key(member), bool(member.config.train.freeze), dropping)
        if key not in self.models:
            self.models[key] = stack_problem(member)
        return self.models[key]

    def leaves(self, problem: str) -> str:
        return f"engine: {problem}; its trials train on the reference loop"

    def say(self, line: str) -> None:
        """Once per sweep: why a model's trials left the stacked engine."""
        if line not in self.said:
            self.said.add(line)
            print(line, file=sys.stderr, flush=True)


class VectorizedEngine:
    name, live, stacks = "vectorized", False, True

    def __init__(self, routes: Routes | None = None):
        self.routes = routes if routes is not None else Routes()

    def train(self, jobs: list[Job], on_epoch: EpochHook | None) -> None:
        routes = self.routes
        for job in jobs:
            routes.check(job.config)
        shared: dict = {}  # the batch's distinct data sets, initial weights and generators, each made once
        members = [prepare_member(job, job.config, shared) for job in jobs]
        hook = None if on_epoch is None else lambda member, record: on_epoch(member.key, record)
        alone: list = []  # members the stacked engine cannot train, or gains nothing from: the reference loop
        for group in group_members(members):  # no hook: nothing runs per member per epoch
            problem = data_problem(group[0].dataset)
            if problem is None and group[0].spec.class_path is None:
                train_group(group, on_epoch=hook, each_epoch=stop_flag.check)
                continue
            problem = problem or routes.model_problem(group[0])
            if problem is None and len(group) > 1:
                try:
                    train_func_group(group, on_epoch=hook, each_epoch=stop_flag.check)
                    continue
                except Exception as exc:  # what the probe did not meet: the reference loop is never worse
                    problem = stack_failure(group[0], exc)
                    routes.models[(model_key(group[0]), bool(group[0].config.train.freeze))] = problem
                    # an update of the header's line (which the probe's success wrote), said as one
                    routes.say(
                        f"engine: not stacked after all: {problem} (met in training, not in its probe); its "
                        "trials train on the reference loop"
                    )
                    routes.said.add(routes.leaves(problem))
            if problem is not None:  # a member alone gains nothing from vmap (TPE's one-trial rounds)
                routes.say(routes.leaves(problem))
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
                job.result = Trained(member.config, member.dataset, member.spec, member.history)


def engine_named(name: str, routes: Routes | None = None) -> Engine:
    """The engine a settled sweep names (`auto` is resolved by sweep.probes.settle first), with the sweep's routes."""
    if name == "vectorized":
        return VectorizedEngine(routes)
    if name == "reference":
        return ReferenceEngine()
    raise ValueError(f"engine {name!r}: the sweep must be settled first (sweep.probes.settle)")


def choose(configs: list[ExperimentConfig], routes: Routes | None = None) -> tuple[str, str]:
    """`engine: auto`: the vectorized engine when it supports every one of the sweep's probe configs, else the
    reference loop; and why, in a few words. A user's model is probed here as training would run it
    (stacked.stack_problem), so the one `engine:` line the sweep prints already says which trials leave it; what
    was found stays on `routes` for the sweep's engines."""
    routes = routes if routes is not None else Routes()
    for config in configs:
        problem = routes.config_problem(config)
        if problem is not None:
            return "reference", f"auto: {problem.split(': ', 1)[-1]}"
    problems = probe_user_models(configs, routes)
    if not problems:
        return "vectorized", "auto: the vectorized engine supports every trial of this sweep"
    said = "; ".join(sorted(set(problems.values())))
    if len(problems) == len(configs):  # no probe stacks
        return "reference", f"auto: {said}"
    for problem in problems.values():  # said in the header: not again when its trials leave the stacked engine
        routes.said.add(routes.leaves(problem))
    return "vectorized", f"auto: {said}; those trials train on the reference loop"


def probe_user_models(configs: list[ExperimentConfig], routes: Routes) -> dict:
    """{probe index: why the stacked engine cannot train it} for the probe configs with a user's model; torch's
    RNG is left as it was. A config that cannot even be prepared is left to experiment.check_probes to explain."""
    problems, shared, state = {}, {}, torch.get_rng_state()
    try:
        for index, config in enumerate(configs):
            if config.model.class_path is None and config.data.source != "python":
                continue
            try:
                member = prepare_member(None, config, shared)
            except Exception:
                continue
            problem = data_problem(member.dataset)
            if problem is None and config.model.class_path is not None:
                problem = routes.model_problem(member)
            if problem is not None:
                problems[index] = problem
    finally:
        torch.set_rng_state(state)
    return problems


def check_runnable(config: ExperimentConfig, engine: str, routes: Routes | None = None) -> None:
    """What a valid config still needs to run here: its device, and the engine's support for it (the engine
    says what it supports; config does not restate it)."""
    if config.device not in ("auto", "cpu"):
        resolve_device(config.device)
    if engine == "vectorized":
        (routes if routes is not None else Routes()).check(config)
