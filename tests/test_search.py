"""search.py: the sweep file's space as Optuna asks it (conditional learning rates each their own parameter), the
grid and its budget, samplers per worker, resuming with other settings refused, and a torn journal repaired."""

import optuna
import pytest

from sweeplab.config import ConfigError
from sweeplab.sweep.search import (
    budget,
    check_compatible,
    grid_space,
    make_sampler,
    open_storage,
    open_study,
    repair_journal,
    suggest,
    values_of,
)
from sweeplab.sweep.spec import SweepSpec

SPACE = {
    "optimizer": {"choices": ["Adam", "SGD"]},
    "lr": {
        "by": "optimizer",
        "cases": {"Adam": {"low": 1e-4, "high": 1e-2, "log": True}, "SGD": {"low": 1e-3, "high": 1e-1, "log": True}},
    },
    "hidden": {"choices": [4, 16, 64]},
}


def spec(**changes) -> SweepSpec:
    return SweepSpec.model_validate({"study": "s", "space": SPACE, **changes})


def test_each_optimizer_s_learning_rate_is_its_own_parameter_and_maps_back():
    sweep = spec()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(12):
        trial = study.ask()
        values = suggest(trial, sweep.space)
        low, high = (1e-4, 1e-2) if values["optimizer"] == "Adam" else (1e-3, 1e-1)
        assert low <= values["lr"] <= high
        assert set(trial.params) == {"optimizer", f"lr_{values['optimizer']}", "hidden"}
        assert values_of(trial.params, sweep.space) == values  # the sweep file's names, as the CLI prints them
        study.tell(trial, 0.0)


def test_the_grid_is_every_choice_and_its_size_caps_the_budget():
    sweep = spec(
        space={"optimizer": {"choices": ["Adam", "SGD"]}, "hidden": {"choices": [4, 16, 64]}},
        sampler={"type": "grid"},
        n_trials=100,
    )
    assert grid_space(sweep.space) == {"optimizer": ["Adam", "SGD"], "hidden": [4, 16, 64]}
    assert budget(sweep) == 6 and budget(spec(n_trials=100)) == 100


def test_workers_draw_different_points_and_a_resumed_study_new_ones():
    sweep = spec(sampler={"type": "random", "seed": 0})

    def first_points(**kwargs):
        study = optuna.create_study(sampler=make_sampler(sweep, **kwargs))
        return [suggest(study.ask(), sweep.space)["hidden"] for _ in range(8)]

    assert first_points() == first_points()  # seeded
    assert first_points(worker_index=1) != first_points()
    assert first_points(resumed_at=8) != first_points()


def test_resuming_a_study_with_another_space_is_refused_in_one_line(tmp_path):
    storage = open_storage(str(tmp_path / "optuna.journal"))
    first = spec()
    study = open_study(first, storage)
    study.tell(study.ask(), 0.5)
    trial = study.ask()
    suggest(trial, first.space)
    study.tell(trial, 0.4)
    changed = spec(space={**SPACE, "hidden": {"choices": [4, 16, 128]}})
    with pytest.raises(ConfigError, match=r"^s\.yaml: .*hidden"):
        check_compatible(study, changed, "s.yaml")
    check_compatible(study, first, "s.yaml")  # the same space resumes


def test_a_journal_whose_last_write_was_cut_short_is_repaired(tmp_path):
    path = tmp_path / "optuna.journal"
    storage = open_storage(str(path))
    study = optuna.create_study(storage=storage, study_name="s")
    study.tell(study.ask(), 1.0)
    assert repair_journal(path) is None  # whole: left as it is
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"op_code": 4, "worker_id": "x", "study_id": 0, "dat')  # a torn last line
    said = repair_journal(path)
    assert said and path.read_bytes() == whole
    assert list(tmp_path.glob("optuna.journal*")) != [path]  # the original is kept beside it
    reread = optuna.load_study(study_name="s", storage=open_storage(str(path)))
    assert [t.value for t in reread.trials] == [1.0]
