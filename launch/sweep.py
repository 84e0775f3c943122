r"""Ablations as a grid of config overrides: one training run per combination, then one results table.

    python launch/sweep.py --config configs/ti.py --root /tmp/sweep \
        --grid method=ti,xti --grid mlm.weight=0,1e-5 --grid seed=0,1 --set max_steps=3001

* Each run gets a workdir under ``--root`` named from its grid values, in grid order
  (``/tmp/sweep/method=ti,mlm.weight=1e-5,seed=0``); ``--set`` values are common to every run and are
  not part of the names. The names are deterministic: the same sweep always maps to the same workdirs.
* ``method`` is special: ``method=NAME`` runs the config file ``NAME.py`` next to ``--config``
  (``configs/xti.py``), so each baseline starts from its own defaults (XTI's λ, batch sizes and
  quirks); every other key is an override, ``--config.KEY=VALUE``, exactly as ``mlmjax.train`` reads it.
* Every run's config is loaded and checked before anything starts or is written: a bad grid, an
  unknown key or a bad value is a one-line error with exit status 2.
* Runs go one after another (``--jobs K``: K at a time), each through ``python -m mlmjax.train`` or
  ``--launcher`` (``LAUNCHER CONFIG WORKDIR --config.KEY=VALUE ...``, the signature of
  ``launch/local.sh``, ``launch/tpu_pod.sh`` and ``sbatch --wait launch/gpu_multinode.sh``). A run's
  output goes to the terminal (with ``--jobs 1``) and to ``ROOT/logs/<name>.log``.
* Runs that differ only in the learning rate, ``prior.weight`` (> 0), ``mlm.weight`` (> 0) or ``seed`` compile
  one step between them: the first run's executable is a persistent-cache hit for the others.
* Resumable: rerunning the sweep skips the runs that finished (their workdir's ``config.json`` agrees
  with the requested config and ``metrics.jsonl`` reached ``max_steps``) and reruns the others, which
  resume from their last checkpoint (``mlmjax.train``'s own behaviour). A failing run is reported and
  the sweep goes on; the exit status is 1 if any run failed or is unfinished.
* The end: ``ROOT/results.md`` and ``ROOT/results.json`` (also printed): one row per run with its grid
  values, status, steps and the last logged ``loss``, ``loss_diff``, ``loss_mlm``, ``mlm_accuracy``
  (and ``loss_prior`` where a run has it); with ``--evaluate_args``, the scores of
  ``python -m mlmjax.evaluate`` for the finished runs; with a ``seed`` grid, each metric's mean ± std
  over the runs that differ only in their seed (grouped by ``mlmjax.evaluate.compare``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import glob
import hashlib
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Sequence

# The metrics the table shows (the last logged row of metrics.jsonl), in this order, where a run has them.
TABLE_METRICS = ("loss", "loss_diff", "loss_prior", "loss_mlm", "mlm_accuracy")
RESULTS_MD, RESULTS_JSON = "results.md", "results.json"
LOGS_DIR, EVAL_DIR = "logs", "eval"
EVAL_PREFIX = "eval."  # the table's name for an mlmjax.evaluate score
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
# Characters kept as they are in a workdir name; a value with any other gets a short hash appended.
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9._+\-]*$")
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # `python launch/sweep.py` from a checkout that is not pip-installed
    sys.path.insert(1, _REPO)


class UsageError(ValueError):
    """A bad command line, grid or override: one line, exit status 2, nothing written."""


# ---------------------------------------------------------------------------------------------------
# The grid


def split_values(text: str) -> list[str]:
    """``"0,1e-5"`` → ``["0", "1e-5"]``: splits at commas outside brackets and quotes, so tuple values
    survive: ``"('a {}',),()"`` → ``["('a {}',)", "()"]``."""
    values, current, depth, quote = [], [], 0, None
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append("".join(current))
            current = []
            continue
        current.append(char)
    if quote or depth:
        raise UsageError(f"unbalanced quotes or brackets in {text!r}")
    values.append("".join(current))
    return values


def parse_assignment(text: str, option: str) -> tuple[str, str]:
    """``"mlm.weight=1e-5"`` → ``("mlm.weight", "1e-5")``; a leading ``config.`` is dropped."""
    key, equals, value = text.partition("=")
    key = key.strip()
    if key.startswith("config."):
        key = key[len("config."):]
    if not equals or not _KEY.match(key):
        raise UsageError(f"{option} {text!r}: expected KEY=VALUE with a dotted config key, e.g. mlm.weight=1e-5")
    return key, value


def parse_grid(grid: Sequence[str], fixed: Sequence[str]) -> tuple[list[tuple[str, list[str]]], list[tuple[str, str]]]:
    """The ``--grid KEY=V1,V2`` and ``--set KEY=VALUE`` options, checked: a key at most once, no empty value."""
    axes: list[tuple[str, list[str]]] = []
    seen: set[str] = set()
    for text in grid:
        key, values = parse_assignment(text, "--grid")
        values = [v.strip() for v in split_values(values)]
        if not all(values):
            raise UsageError(f"--grid {text!r}: an empty value (values are separated by commas)")
        if len(set(values)) != len(values):
            raise UsageError(f"--grid {text!r}: a value is listed twice")
        if key in seen:
            raise UsageError(f"--grid {key}: the key is given twice")
        seen.add(key)
        axes.append((key, values))
    settings: list[tuple[str, str]] = []
    for text in fixed:
        key, value = parse_assignment(text, "--set")
        if key in seen:
            raise UsageError(f"--set {key}: the key is given twice (or also in --grid)")
        seen.add(key)
        settings.append((key, value.strip()))
    return axes, settings


def expand(axes: Sequence[tuple[str, Sequence[str]]]) -> list[list[tuple[str, str]]]:
    """Every combination, the first axis varying slowest (the order runs go in)."""
    return [list(zip([key for key, _ in axes], values)) for values in itertools.product(*[v for _, v in axes])]


def run_name(assignments: Sequence[tuple[str, str]]) -> str:
    """The workdir name of a run: ``method=ti,mlm.weight=1e-5,seed=0`` (``default`` for an empty grid).

    Values are written as given; one with characters that do not belong in a file name (``/``, spaces,
    quotes, brackets) is written with those replaced by ``_`` and an 8-digit hash of the exact value, so
    two different values never share a workdir.
    """
    parts = []
    for key, value in assignments:
        if not _SAFE_VALUE.match(value) or len(value) > 40:
            digest = hashlib.sha256(value.encode()).hexdigest()[:8]
            value = (re.sub(r"[^A-Za-z0-9._+\-]+", "_", value).strip("_")[:24] or "empty") + "-" + digest
        parts.append(f"{key}={value}")
    return ",".join(parts) or "default"


# ---------------------------------------------------------------------------------------------------
# Runs


@dataclasses.dataclass
class Run:
    name: str
    workdir: str  # where the run trains (what the launcher gets)
    results: str  # where its metrics.jsonl is read (the workdir, or --results_root/name)
    config_file: str
    grid: dict[str, str]  # this run's grid values (method included)
    overrides: list[tuple[str, str]]  # what goes on the command line (method excluded)
    config: dict  # the requested config, as JSON
    command: list[str] = dataclasses.field(default_factory=list)
    status: str = "pending"
    action: str = ""  # "ran", "skipped" (finished earlier), or "" (not reached: interrupted)
    seconds: float = 0.0
    error: str = ""


def _split_config_file(path: str) -> tuple[str, str]:
    """``configs/x.py:a,b`` → (``configs/x.py``, ``:a,b``)."""
    file, colon, options = path.partition(":")
    return file, colon + options


def config_file_for(base: str, method: str | None) -> str:
    """The config file a run uses: ``--config``, or for ``method=NAME`` the file ``NAME.py`` beside it."""
    file, options = _split_config_file(base)
    if method is None:
        return base
    candidate = os.path.join(os.path.dirname(file), f"{method}.py")
    if not os.path.isfile(candidate):
        raise UsageError(f"method={method}: no config file {candidate} (method=NAME runs the config NAME.py next to "
                         f"--config {file})")
    return candidate + (options if os.path.abspath(candidate) == os.path.abspath(file) else "")


def load_config(config_file: str, overrides: Sequence[tuple[str, str]]):
    """The config ``mlmjax.train`` would run (:func:`mlmjax.config.load_config_file`), or a UsageError."""
    from mlmjax import config as config_lib

    try:
        return config_lib.load_config_file(config_file, overrides)
    except ValueError as error:
        raise UsageError(str(error)) from None


def plan(config: str, root: str, axes, settings, results_root: str | None = None) -> list[Run]:
    """Every run of the sweep, each config loaded and checked (UsageError on the first bad one)."""
    runs = []
    for assignments in expand(axes):
        everything = assignments + list(settings)
        method = dict(everything).get("method")
        config_file = config_file_for(config, method)
        overrides = [(key, value) for key, value in everything if key != "method"]
        loaded = load_config(config_file, overrides)
        name = run_name(assignments)
        runs.append(Run(name=name, workdir=os.path.join(root, name),
                        results=os.path.join(results_root or root, name), config_file=config_file,
                        grid=dict(assignments), overrides=overrides,
                        config=json.loads(json.dumps(loaded.to_dict()))))
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise UsageError("two runs of the grid get the same workdir name; give distinct values")
    return runs


def train_command(run: Run, launcher: Sequence[str]) -> list[str]:
    flags = [f"--config.{key}={value}" for key, value in run.overrides]
    if launcher:
        return [*launcher, run.config_file, run.workdir, *flags]
    return [sys.executable, "-m", "mlmjax.train", "--config", run.config_file, "--workdir", run.workdir, *flags]


def read_metrics(folder: str) -> list[dict]:
    """The rows of ``folder/metrics.jsonl`` as ``mlmjax.loop`` reads them; a damaged file counts as no
    rows here (the run is then not finished, and ``mlmjax.train`` says what is wrong with it)."""
    from mlmjax import loop

    try:
        return loop.read_metrics(folder)
    except ValueError:
        return []


def finished_earlier(run: Run) -> bool:
    """Whether the workdir holds this run, finished: ``metrics.jsonl`` reached ``max_steps``, the final
    checkpoint and samples exist, and ``config.json`` agrees with the requested config on every field
    that is not resumable (``mlmjax.workdir.RESUMABLE``) or left empty to be filled in (``resolution=0``,
    an empty ``class_noun``). Anything else goes to ``mlmjax.train``, which resumes or refuses it."""
    from mlmjax import config as config_lib
    from mlmjax import workdir as workdir_lib

    rows = read_metrics(run.workdir)
    max_steps = run.config.get("max_steps")
    if not rows or max_steps is None or rows[-1]["step"] < max_steps:
        return False
    if not os.path.isdir(os.path.join(run.workdir, "checkpoints", str(max_steps))):
        return False
    samples = os.path.join(run.workdir, "samples", f"step_{max_steps}")
    if run.config.get("sample_prompts") and not os.path.isdir(samples):
        return False
    try:
        with open(os.path.join(run.workdir, workdir_lib.CONFIG_FILE)) as f:
            saved = config_lib.flatten_config(json.load(f))
    except (OSError, ValueError):
        return False
    for key, value in config_lib.flatten_config(run.config).items():
        if key in workdir_lib.RESUMABLE or value == "" or (key == "resolution" and value == 0):
            continue  # resumable, or filled in by mlmjax.train (class_noun, resolution)
        if saved.get(key) != value:
            return False
    return True


def _last_error_line(log: str) -> str:
    """The line a failing run ended with (mlmjax's one-line ``error: ...``, or a traceback's last line)."""
    try:
        with open(log, errors="replace") as f:
            lines = [line.strip() for line in f.read().replace("\r", "\n").splitlines() if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or [""])[-1][:300]


_PRINT_LOCK = threading.Lock()
_LIVE: set[subprocess.Popen] = set()  # the runs' processes now running (--jobs K: up to K)


def execute(command: Sequence[str], log_path: str, stream: bool) -> int:
    """Runs ``command`` with its output in ``log_path`` (and on the terminal when ``stream``)."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    env = dict(os.environ)
    # `python -m mlmjax.train` from any folder, installed or not.
    env["PYTHONPATH"] = _REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(log_path, "ab") as log:
        log.write(f"$ {shlex.join(command)}\n".encode())
        log.flush()
        # In a session of its own: Ctrl-C reaches the sweep only, which stops the run with SIGTERM (on
        # which mlmjax.train saves a checkpoint) instead of killing it mid-step.
        process = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
        with _PRINT_LOCK:
            _LIVE.add(process)
        try:
            while chunk := process.stdout.read1(1 << 16):
                log.write(chunk)
                log.flush()
                if stream:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
            return process.wait()
        except BaseException:
            process.terminate()  # SIGTERM: mlmjax.train saves a checkpoint and exits
            log.write(process.stdout.read())  # up to its "stopped by SIGTERM" line
            process.wait()
            raise
        finally:
            with _PRINT_LOCK:
                _LIVE.discard(process)


def run_one(run: Run, root: str, *, stream: bool, skip_finished: bool) -> Run:
    if skip_finished and finished_earlier(run):
        run.action, run.status = "skipped", "finished"
        _say(f"[sweep] {run.name}: finished earlier, skipped")
        return run
    _say(f"[sweep] {run.name}: {shlex.join(run.command)}")
    log = os.path.join(root, LOGS_DIR, f"{run.name}.log")
    start = time.perf_counter()
    code = execute(run.command, log, stream)
    run.seconds, run.action = time.perf_counter() - start, "ran"
    rows = read_metrics(run.results)
    if code != 0:
        run.status, run.error = f"failed (exit {code})", _last_error_line(log)
    elif rows and rows[-1]["step"] >= run.config.get("max_steps", 0):
        run.status = "finished"
    else:
        run.status, run.error = "unfinished", "stopped before max_steps (preempted?); rerun the sweep to resume"
    _say(f"[sweep] {run.name}: {run.status} in {run.seconds:.0f} s" + (f": {run.error}" if run.error else ""))
    return run


def _say(message: str) -> None:
    with _PRINT_LOCK:
        print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------
# Evaluation and the table


def evaluate(runs: Sequence[Run], root: str, evaluate_args: Sequence[str]) -> str:
    """``python -m mlmjax.evaluate`` over the finished runs (one process: the image models load once);
    each run's scores land in its ``eval/step_<K>/results.json`` (read by :func:`evaluation_scores`).
    Returns an error line, or "" when it worked."""
    finished = [run for run in runs if run.status == "finished"]
    if not finished:
        return ""
    command = [sys.executable, "-m", "mlmjax.evaluate", *[f"--workdir={run.results}" for run in finished]]
    if not any(arg == "--out" or arg.startswith("--out=") for arg in evaluate_args):
        command.append(f"--out={os.path.join(root, EVAL_DIR)}")
    command += list(evaluate_args)
    _say(f"[sweep] evaluating {len(finished)} run(s): {shlex.join(command)}")
    log = os.path.join(root, LOGS_DIR, "evaluate.log")
    code = execute(command, log, stream=True)
    return "" if code == 0 else f"evaluation failed (exit {code}): {_last_error_line(log)}"


def evaluation_scores(run: Run) -> dict[str, float]:
    """The metric means of the run's newest ``eval/step_<K>/results.json`` (K its last step if present)."""
    rows = read_metrics(run.results)
    candidates = sorted(glob.glob(os.path.join(run.results, EVAL_DIR, "step_*", "results.json")),
                        key=lambda path: int(re.sub(r"\D", "", os.path.basename(os.path.dirname(path))) or 0))
    preferred = os.path.join(run.results, EVAL_DIR, f"step_{rows[-1]['step']}", "results.json") if rows else None
    path = preferred if preferred in candidates else (candidates[-1] if candidates else None)
    if path is None:
        return {}
    with open(path) as f:
        results = json.load(f)
    return {name: float(value["mean"]) for name, value in results.get("metrics", {}).items()}


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if 1e-3 <= abs(value) < 1e4 or value == 0 else f"{value:.3e}"
    return str(value)


def results_rows(runs: Sequence[Run], with_evaluation: bool) -> list[dict]:
    rows = []
    for run in runs:
        metrics = read_metrics(run.results)
        last = metrics[-1] if metrics else {}
        row = {"name": run.name, "workdir": run.workdir, "config": run.config_file, "grid": run.grid,
               "overrides": dict(run.overrides), "status": run.status, "action": run.action,
               "steps": last.get("step"), "max_steps": run.config.get("max_steps"),
               "metrics": {name: value for name, value in last.items() if name != "step"},
               "seconds": round(run.seconds, 1), "error": run.error}
        if with_evaluation:
            row["evaluation"] = evaluation_scores(run) if run.status == "finished" else {}
        rows.append(row)
    return rows


def grouped(rows: Sequence[dict], columns: Sequence[str]) -> list[dict]:
    """Runs that differ only in their seed, grouped by ``mlmjax.evaluate.compare``: each metric's mean and
    standard deviation over the group. The group is named by its grid values without the seed."""
    from mlmjax import evaluate as evaluate_lib

    results = []
    for row in rows:
        if row["status"] != "finished":
            continue
        label = ",".join(f"{key}={value}" for key, value in row["grid"].items() if key != "seed") or "all"
        values = {**{name: row["metrics"][name] for name in columns if name in row["metrics"]},
                  **{EVAL_PREFIX + name: value for name, value in row.get("evaluation", {}).items()}}
        results.append({"method": label, "mlm_weight": 0.0, "workdir": row["workdir"],
                        "metrics": {name: {"mean": value} for name, value in values.items()}})
    groups, _ = evaluate_lib.compare(results)
    return [{"group": group["method"], "runs": group["runs"], "workdirs": group["workdirs"],
             "metrics": {name: value for name, value in group.items()
                         if isinstance(value, dict) and "mean" in value}} for group in groups]


def table(rows: Sequence[dict], groups: Sequence[dict] | None, grid_keys: Sequence[str]) -> str:
    columns = [name for name in TABLE_METRICS if any(name in row["metrics"] for row in rows)]
    if not columns:  # another kind of run (contextualizer pretraining): every logged scalar
        columns = sorted({name for row in rows for name in row["metrics"]})
    scores = sorted({name for row in rows for name in row.get("evaluation", {})})
    # Evaluation scores are named eval.<metric>: the evaluation has an mlm_accuracy of its own (held-out
    # context prompts), not the training's last-batch one.
    header = ["run", *grid_keys, "status", "steps", *columns, *[EVAL_PREFIX + name for name in scores]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        steps = "" if row["steps"] is None else f"{row['steps']}/{row['max_steps']}"
        cells = [row["name"], *[row["grid"].get(key, "") for key in grid_keys], row["status"], steps,
                 *[_format(row["metrics"].get(name)) for name in columns],
                 *[_format(row.get("evaluation", {}).get(name)) for name in scores]]
        lines.append("| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |")
    failed = [row for row in rows if row["error"]]
    if failed:
        lines += [""] + [f"* {row['name']}: {row['status']}: {row['error']}" for row in failed]
    if groups:
        names = [name for name in [*columns, *[EVAL_PREFIX + name for name in scores]]
                 if any(name in group["metrics"] for group in groups)]
        lines += ["", "Mean ± standard deviation over seeds:", "",
                  "| group | runs | " + " | ".join(names) + " |", "|" + "---|" * (2 + len(names))]
        for group in groups:
            cells = [f"{group['metrics'][name]['mean']:.4f} ± {group['metrics'][name]['std']:.4f}"
                     if name in group["metrics"] else "" for name in names]
            lines.append(f"| {group['group']} | {group['runs']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(root: str, runs: Sequence[Run], axes, settings, *, with_evaluation: bool,
                  evaluation_error: str = "") -> str:
    rows = results_rows(runs, with_evaluation)
    grid_keys = [key for key, _ in axes]
    columns = [name for name in TABLE_METRICS if any(name in row["metrics"] for row in rows)]
    groups = grouped(rows, columns) if "seed" in dict(axes) and len(dict(axes)["seed"]) > 1 else None
    text = table(rows, groups, grid_keys)
    if evaluation_error:
        text += f"\n{evaluation_error}\n"
    data = {"root": root, "grid": {key: values for key, values in axes}, "set": dict(settings), "runs": rows,
            "groups": groups, "evaluation_error": evaluation_error or None}
    _write_atomic(os.path.join(root, RESULTS_JSON), json.dumps(data, indent=2) + "\n")
    _write_atomic(os.path.join(root, RESULTS_MD), text)
    return text


def _write_atomic(path: str, text: str) -> None:
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as f:
        f.write(text)
    os.replace(temporary, path)


# ---------------------------------------------------------------------------------------------------
# The command


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="launch/sweep.py", description="Run a grid of mlmjax.train config overrides; write one results table.",
        epilog="Example: python launch/sweep.py --config configs/ti.py --root /tmp/sweep --grid mlm.weight=0,1e-5 "
               "--grid seed=0,1 --set max_steps=3001   (see launch/README.md)")
    parser.add_argument("--config", required=True, help="the method config, e.g. configs/ti.py (method=NAME in the "
                        "grid picks NAME.py beside it)")
    parser.add_argument("--root", required=True, help="the sweep's folder: one workdir per run, logs/, results.md/json")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="a config key and its values (repeat: every combination runs)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="fixed",
                        help="a config override common to every run (repeatable)")
    parser.add_argument("--launcher", default="", help="a command put before 'CONFIG WORKDIR --config.KEY=VALUE...', "
                        "e.g. 'launch/local.sh' or 'sbatch --wait launch/gpu_multinode.sh' "
                        "(default: python -m mlmjax.train)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1: on one machine a second run "
                        "only competes for the same devices)")
    parser.add_argument("--results_root", default="", help="where each run's metrics.jsonl is read, as "
                        "RESULTS_ROOT/<name> (default: --root; for remote launchers that fetch results, e.g. "
                        "tpu_pod.sh's tpu-results/); with it the sweep skips nothing itself")
    parser.add_argument("--no_skip", action="store_true", help="hand finished runs to mlmjax.train too (which checks "
                        "the full run identity and does nothing)")
    parser.add_argument("--evaluate_args", default="", help="arguments for python -m mlmjax.evaluate, run on the "
                        "finished runs at the end, e.g. '--clip /data/clip --dino /data/dino'")
    parser.add_argument("--dry-run", "--dry_run", action="store_true", dest="dry_run",
                        help="print the commands; run and write nothing")
    return parser.parse_args(argv)  # a usage error: one line and exit status 2 (argparse's own)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.jobs < 1:
            raise UsageError(f"--jobs {args.jobs}: must be at least 1")
        axes, settings = parse_grid(args.grid, args.fixed)
        launcher = shlex.split(args.launcher)
        evaluate_args = shlex.split(args.evaluate_args)
        root = args.root if launcher else os.path.abspath(args.root)
        results_root = os.path.abspath(args.results_root) if args.results_root else None
        runs = plan(args.config, root, axes, settings, results_root)
    except UsageError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    for run in runs:
        run.command = train_command(run, launcher)
    if args.dry_run:
        for run in runs:
            print(shlex.join(run.command))
        return 0

    os.makedirs(root, exist_ok=True)
    signal.signal(signal.SIGTERM, _interrupt)  # a preempted sweep stops its run cleanly too
    skip = not (args.no_skip or results_root)
    _say(f"[sweep] {len(runs)} run(s) under {root}")
    pool = concurrent.futures.ThreadPoolExecutor(args.jobs)
    try:
        if args.jobs == 1:
            for run in runs:
                run_one(run, root, stream=True, skip_finished=skip)
        else:
            list(pool.map(lambda run: run_one(run, root, stream=False, skip_finished=skip), runs))
    except KeyboardInterrupt:
        _say("[sweep] interrupted: stopping the runs (each saves a checkpoint); rerun the sweep to go on")
        with _PRINT_LOCK:
            for process in list(_LIVE):
                process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        for run in runs:
            if run.status == "pending":
                run.status = "unfinished"
        print(write_results(root, runs, axes, settings, with_evaluation=False))
        return 130
    pool.shutdown()
    evaluation_error = evaluate(runs, root, evaluate_args) if evaluate_args else ""
    text = write_results(root, runs, axes, settings, with_evaluation=bool(evaluate_args),
                         evaluation_error=evaluation_error)
    print(text)
    print(f"[sweep] wrote {os.path.join(root, RESULTS_MD)} and {RESULTS_JSON}", file=sys.stderr)
    bad = [run.name for run in runs if run.status != "finished"]
    if bad:
        print(f"[sweep] {len(bad)} of {len(runs)} run(s) did not finish: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad or evaluation_error else 0


if __name__ == "__main__":
    sys.exit(main())
