"""`python -m mlmjax.world.experiment`: a smoke run on the embedded default (TI, one seed, 2 steps, one
image for each of a few held-out prompts), its files and table, a rerun that trains and scores nothing,
a rescored run that gives the same numbers, and one-line errors for bad flags."""

import contextlib
import io
import json
import os

import pytest

from mlmjax import config as config_lib
from mlmjax.world import experiment, experiment_scores
from mlmjax.world.captions import eval_prompts

MAX_PROMPTS = 3
ARGS = ["--methods", "ti", "--seeds", "0", "--steps", "2", "--images_per_prompt", "1",
        "--max_prompts", str(MAX_PROMPTS), "--grid_prompts", "2", "--set", "ti.learning_rate=0.001",
        "--set", "ti.mlm.batch_size=5"]
RUNS = ("ti-mlm_off-s0", "ti-mlm_on-s0")


def _main(workdir: str) -> str:
    """Runs the command in this process (the compiled steps are reused); returns what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        experiment.main(["--workdir", workdir] + ARGS)
    return out.getvalue()


def _run_file(workdir: str, run: str, name: str) -> str:
    return os.path.join(workdir, experiment.RUNS_DIR, run, name)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("experiment"))
    return workdir, _main(workdir)


def test_smoke_run_writes_the_table_grids_and_per_run_scores(smoke):
    workdir, printed = smoke
    for name in (experiment_scores.RESULTS_MD, experiment_scores.RESULTS_JSON, experiment_scores.COMPARISON_GRID):
        assert os.path.isfile(os.path.join(workdir, name)), name
    for run in RUNS:
        assert f"{run}: trained 2 steps" in printed
        for name in (experiment.SCORES_FILE, experiment_scores.GRID_FILE):
            assert os.path.isfile(_run_file(workdir, run, name)), (run, name)
    assert "| ti | off |" in printed and "| ti | on |" in printed


def test_table_has_the_rows_asked_for_with_numbers_in_unit_interval(smoke):
    workdir, _ = smoke
    with open(os.path.join(workdir, experiment_scores.RESULTS_JSON)) as f:
        results = json.load(f)
    assert [(row["method"], row["mlm"], row["seeds"]) for row in results["rows"]] == [("ti", "off", 1), ("ti", "on", 1)]
    assert results["rows"][0]["mlm_weight"] == [0.0] and results["rows"][1]["mlm_weight"][0] > 0
    assert [row["learning_rate"] for row in results["rows"]] == [[0.001], [0.001]]  # --set, not the config's 2e-3
    for row in results["rows"]:
        for part in ("heldout", "training_context"):
            for name, stat in row[part].items():
                assert 0 <= stat["mean"] <= 1 and stat["std"] == 0, (row["mlm"], part, name)
    for run in RUNS:
        with open(_run_file(workdir, run, experiment.SCORES_FILE)) as f:
            scores = json.load(f)
        assert scores["overrides"] == {"learning_rate": 0.001, "mlm.batch_size": 5}
        with open(_run_file(workdir, run, "config.json")) as f:
            assert json.load(f)["mlm"]["batch_size"] == 5  # a nested field reaches the trained run
        assert len(scores["prompts"]) == MAX_PROMPTS + 1  # + the training context, last
        assert scores["prompts"][-1]["text"] == "<concept> teapot on the kitchen table"
        assert all(0 <= v <= 1 for p in scores["prompts"] for name in experiment_scores.SUMMARY_METRICS
                   for v in p[name])


def test_rerun_retrains_and_rescores_nothing(smoke):
    workdir, _ = smoke
    watched = [_run_file(workdir, run, name) for run in RUNS for name in (experiment.SCORES_FILE, "metrics.jsonl")]
    before = [os.stat(path).st_mtime_ns for path in watched]
    printed = _main(workdir)
    assert printed.count("already scored, skipped") == len(RUNS) and "trained 2 steps" not in printed
    assert [os.stat(path).st_mtime_ns for path in watched] == before


def test_a_trained_run_is_rescored_to_the_same_numbers(smoke):
    workdir, _ = smoke
    path = _run_file(workdir, RUNS[0], experiment.SCORES_FILE)
    with open(path) as f:
        first = json.load(f)
    os.remove(path)
    os.rename(_run_file(workdir, RUNS[0], experiment_scores.IMAGES_DIR),
              _run_file(workdir, RUNS[0], "old_images"))  # resample too, not just read back
    printed = _main(workdir)
    assert f"{RUNS[0]}: already trained, not retrained" in printed
    with open(path) as f:
        assert json.load(f) == first


def test_max_prompts_spreads_over_caption_types():
    chosen = experiment_scores.spread(eval_prompts("{}"), 4)
    assert chosen[0] == eval_prompts("{}")[0] and chosen[-1] == eval_prompts("{}")[-1]
    assert experiment_scores.eval_templates(0)[:-1] == eval_prompts("{}")


@pytest.mark.parametrize("flags, message", [
    (["--methods", "ti,foo"], "--methods='ti,foo': unknown method foo"),
    (["--methods", ""], "--methods='': no method given"),
    (["--seeds", ""], "--seeds=''"),
    (["--seeds", "a"], "--seeds=a"),
    (["--steps", "0"], "--steps=0: must be a positive integer"),
    (["--steps", "-3"], "--steps=-3"),
    (["--images_per_prompt", "0"], "--images_per_prompt=0"),
    (["--mlm", "maybe"], "--mlm=maybe"),
    (["--set", "ti.learning_rate"], "--set ti.learning_rate: write METHOD.KEY=VALUE"),
    (["--methods", "ti", "--set", "xti.learning_rate=1e-3"], "'xti' is not one of --methods (ti)"),
    (["--set", "ti.learning_rat=1e-3"], "learning_rat: " + os.path.join(config_lib.CONFIGS_DIR, "ti.py")
     + " has no such config key; did you mean learning_rate?"),
    (["--set", "ti.learning_rate=fast"], "ti.py with learning_rate=fast: flag --config.learning_rate=fast: "
     "could not convert string to float"),
    (["--set", "ti.mlm.batch_size=2.5"], "mlm.batch_size=2.5"),
    (["--set", "ti.mlm.weight=1e-3"], "the experiment sets mlm.weight itself; use --mlm_weight"),
])
def test_bad_flags_are_one_line_errors(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        experiment.main(["--workdir", str(tmp_path / "w")] + flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not os.path.exists(tmp_path / "w")


def test_a_scored_run_asked_with_another_set_is_refused(smoke, capsys):
    workdir, _ = smoke
    changed = [a if a != "ti.learning_rate=0.001" else "ti.learning_rate=0.002" for a in ARGS]
    with pytest.raises(SystemExit) as exit_info:
        experiment.main(["--workdir", workdir] + changed)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "was scored with other learning_rate and overrides than asked now" in err and err.count("\n") == 1
