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
OWN_CONTEXT_IMAGES = 4
ARGS = ["--methods", "ti", "--seeds", "0", "--steps", "2", "--images_per_prompt", "1",
        "--own_context_images", str(OWN_CONTEXT_IMAGES), "--max_prompts", str(MAX_PROMPTS), "--grid_prompts", "2",
        "--set", "ti.learning_rate=0.001", "--set", "ti.mlm.batch_size=5"]
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
        assert len(scores["prompts"]) == MAX_PROMPTS + 1  # + the training context, last (the grids' column)
        assert scores["prompts"][-1]["text"] == "<concept> teapot on the kitchen table"
        assert all(0 <= v <= 1 for p in scores["prompts"] for name in experiment_scores.SUMMARY_METRICS
                   for v in p[name])
        # The sanity check's numbers are the means over the own context's dedicated images.
        own = scores["own_context"]
        assert own["text"] == "<concept> teapot on the kitchen table"
        assert os.path.isdir(_run_file(workdir, run, experiment_scores.OWN_CONTEXT_DIR))
        for name in experiment_scores.SUMMARY_METRICS:
            assert len(own[name]) == OWN_CONTEXT_IMAGES
            assert scores["training_context"][name] == pytest.approx(sum(own[name]) / OWN_CONTEXT_IMAGES)
    with open(os.path.join(workdir, experiment_scores.RESULTS_MD)) as f:
        assert f"{OWN_CONTEXT_IMAGES} images per run" in f.read()


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
    for folder in (experiment_scores.IMAGES_DIR, experiment_scores.OWN_CONTEXT_DIR):  # resample, not read back
        os.rename(_run_file(workdir, RUNS[0], folder), _run_file(workdir, RUNS[0], "old_" + folder))
    printed = _main(workdir)
    assert f"{RUNS[0]}: already trained, not retrained" in printed
    with open(path) as f:
        assert json.load(f) == first


def test_max_prompts_spreads_over_caption_types():
    chosen = experiment_scores.spread(eval_prompts("{}"), 4)
    assert chosen[0] == eval_prompts("{}")[0] and chosen[-1] == eval_prompts("{}")[-1]
    assert experiment_scores.eval_templates(0)[:-1] == eval_prompts("{}")


def test_a_lambda_sweep_is_one_mlm_on_run_per_value_and_seed_in_its_own_folder(tmp_path):
    options = experiment.parse_args(["--workdir", str(tmp_path), "--methods", "ti,dreambooth", "--seeds", "0,1",
                                     "--mlm_weight", "1e-3, 0.01"])
    specs = experiment.run_specs(options)
    assert [spec.name for spec in specs[:6]] == [
        "ti-mlm_off-s0", "ti-mlm_off-s1", "ti-mlm_0.001-s0", "ti-mlm_0.001-s1", "ti-mlm_0.01-s0", "ti-mlm_0.01-s1"]
    assert len(specs) == 12 and len({experiment.run_dir(options, spec) for spec in specs}) == 12
    weights = {spec.name: experiment.run_config(spec, options).mlm.weight for spec in specs}
    assert weights["ti-mlm_off-s1"] == 0 and weights["dreambooth-mlm_0.01-s0"] == 0.01
    assert weights["ti-mlm_0.001-s0"] == 1e-3
    # Without --mlm_weight: one MLM-on arm at each config's λ, in the folders earlier workdirs have.
    default = experiment.parse_args(["--workdir", str(tmp_path), "--methods", "ti", "--seeds", "0"])
    (off, on) = experiment.run_specs(default)
    assert (off.name, on.name) == ("ti-mlm_off-s0", "ti-mlm_on-s0")
    assert experiment.run_config(on, default).mlm.weight == config_lib.load_method_config("ti", []).mlm.weight


def test_lambdas_that_print_alike_still_get_their_own_run_folders(tmp_path):
    options = experiment.parse_args(["--workdir", str(tmp_path), "--methods", "ti", "--seeds", "0", "--mlm", "on",
                                     "--mlm_weight", "1e-3,1.0000001e-3,2.5e-4,1e-5"])
    assert [spec.name for spec in experiment.run_specs(options)] == [
        "ti-mlm_0.001-s0", "ti-mlm_0.0010000001-s0", "ti-mlm_0.00025-s0", "ti-mlm_1e-05-s0"]


def _row(method, mlm, weight, context, concept, seeds=3):
    stat = lambda mean: {"mean": mean, "std": 0.01, "n": seeds}  # noqa: E731
    return {"method": method, "mlm": mlm, "mlm_weight": [weight], "learning_rate": [1e-3], "seeds": seeds,
            "steps": [10], "heldout": {"context_fidelity": stat(context), "is_concept": stat(concept),
                                       "concept_probability": stat(concept)}}


def test_lambda_plot_is_drawn_for_a_sweep_only(tmp_path):
    from PIL import Image

    path = str(tmp_path / experiment_scores.LAMBDA_PLOT)
    plain = [_row("ti", "off", 0.0, 0.35, 0.46), _row("ti", "on", 1e-5, 0.34, 0.45)]
    assert not experiment_scores.lambda_plot(plain, path) and not os.path.exists(path)
    swept = plain + [_row("ti", "on", 1e-3, 0.33, 0.40), _row("xti", "on", 1e-3, 0.37, 0.5),
                     _row("xti", "on", 1e-1, 0.36, 0.3)]  # xti without an MLM-off row still gets a line
    assert set(experiment_scores._sweeps(swept)) == {"ti", "xti"}
    assert experiment_scores.lambda_plot(swept, path)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (1000, 380)


@pytest.mark.parametrize("flags, message", [
    (["--methods", "ti,foo"], "--methods='ti,foo': unknown method foo"),
    (["--methods", ""], "--methods='': no method given"),
    (["--seeds", ""], "--seeds=''"),
    (["--seeds", "a"], "--seeds=a"),
    (["--steps", "0"], "--steps=0: must be a positive integer"),
    (["--steps", "-3"], "--steps=-3"),
    (["--images_per_prompt", "0"], "--images_per_prompt=0"),
    (["--own_context_images", "0"], "--own_context_images=0: must be a positive integer"),
    (["--mlm", "maybe"], "--mlm=maybe"),
    (["--mlm_weight", "1e-3,big"], "--mlm_weight=1e-3,big: must be comma-separated numbers"),
    (["--mlm_weight", "1e-3,0"], "--mlm_weight=1e-3,0: give distinct positive values"),
    (["--mlm_weight", "1e-3,0.001"], "give distinct positive values"),
    (["--mlm", "off", "--mlm_weight", "1e-3"], "λ is for MLM-on runs; add on to --mlm"),
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


def test_a_run_scored_with_another_own_context_count_is_refused(smoke, capsys):
    workdir, _ = smoke
    changed = [a if a != str(OWN_CONTEXT_IMAGES) else "5" for a in ARGS]
    with pytest.raises(SystemExit) as exit_info:
        experiment.main(["--workdir", workdir] + changed)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "was scored with other own_context_sampling than asked now" in err and err.count("\n") == 1
