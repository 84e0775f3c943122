"""The launchers in launch/: shell syntax, usage errors, the TPU and SLURM scripts against stub
gcloud/scontrol/srun executables that record their arguments (nothing reaches a cloud or a cluster),
and launch/sweep.py: grid parsing, workdir names, validation before anything is written, the results
table, and a real two-run tiny sweep that a rerun skips."""

import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest

# ml_collections loads config files with the deprecated importlib load_module().
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = ("tpu_pod.sh", "gpu_multinode.sh", "local.sh")


def _load_sweep():
    spec = importlib.util.spec_from_file_location("launch_sweep", os.path.join(LAUNCH, "sweep.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


sweep = _load_sweep()


def _run(args, env=None, cwd=REPO, timeout=120):
    return subprocess.run(args, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


# ---------------------------------------------------------------------------------------------------
# Shell scripts: syntax, help, usage errors


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_syntax(script):
    path = os.path.join(LAUNCH, script)
    assert _run(["bash", "-n", path]).returncode == 0
    assert os.access(path, os.X_OK), f"{script} is not executable"
    if shutil.which("shellcheck"):
        result = _run(["shellcheck", "-S", "warning", path])
        assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    result = _run([os.path.join(LAUNCH, script), "--help"])
    assert result.returncode == 0
    assert "CONFIG WORKDIR" in result.stdout + result.stderr


@pytest.mark.parametrize("args, message", [
    (["tpu_pod.sh"], "CONFIG and WORKDIR are required"),
    (["tpu_pod.sh", "configs/ti.py"], "CONFIG and WORKDIR are required"),
    (["tpu_pod.sh", "--bogus", "configs/ti.py", "/w"], "unknown option --bogus"),
    (["tpu_pod.sh", "--zone"], "--zone needs a value"),
    (["tpu_pod.sh", "configs/ti.py", "gs://bucket/run"], "mount the bucket"),
    (["tpu_pod.sh", "configs/nope.py", "/w"], "configs/nope.py: file not found"),
    (["tpu_pod.sh", "configs/ti.py", "/w", "stray"], "'stray' is not a flag of mlmjax.train"),
    (["tpu_pod.sh", "--retries", "x", "configs/ti.py", "/w"], "--retries x"),
    (["tpu_pod.sh", "--spot", "--preemptible", "configs/ti.py", "/w"], "exclude each other"),
    (["tpu_pod.sh", "--copy", "nodest", "configs/ti.py", "/w"], "expected SRC=DEST"),
    (["gpu_multinode.sh", "configs/ti.py"], "usage: sbatch launch/gpu_multinode.sh"),
    (["gpu_multinode.sh", "configs/ti.py", "/w"], "not inside a SLURM job"),
    (["gpu_multinode.sh", "configs/ti.py", "/w", "stray"], "'stray' is not a flag"),
    (["local.sh", "configs/ti.py"], "usage: launch/local.sh"),
])
def test_usage_errors_exit_2(args, message, tmp_path):
    env = {"PATH": f"{_stub_bin(tmp_path)}:{os.environ['PATH']}", "STUB_LOG": str(tmp_path / "calls.jsonl")}
    env.pop("SLURM_JOB_ID", None)
    result = _run([os.path.join(LAUNCH, args[0]), *args[1:]], env={**env, "SLURM_JOB_ID": ""})
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "calls.jsonl").exists(), "a usage error must not reach gcloud/srun"


# ---------------------------------------------------------------------------------------------------
# Stub executables


STUB = r'''#!PYTHON
"""Records its argv as one JSON line in $STUB_LOG and plays its part (gcloud / scontrol / srun / python)."""
import json, os, shutil, subprocess, sys, tarfile, io
name, args = os.path.basename(sys.argv[0]), sys.argv[1:]
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps({"cmd": name, "args": args, "procid": os.environ.get("SLURM_PROCID")}) + "\n")
stub_dir = os.path.dirname(os.environ["STUB_LOG"])
if name == "gcloud":
    if "describe" in args:
        state = os.environ.get("STUB_TPU_STATE", "")
        if not state:
            print("ERROR: NOT_FOUND", file=sys.stderr)
            sys.exit(1)
        print(state)
    elif "scp" in args:
        paths = [a for a in args if not a.startswith("-") and a not in ("compute", "tpus", "tpu-vm", "scp")]
        source, dest = paths[0], paths[-1]
        if ":" in source:  # fetching from worker 0: a results tarball
            with tarfile.open(dest, "w:gz") as tar:
                data = b'{"step": 3, "loss": 0.5}\n'
                info = tarfile.TarInfo("metrics.jsonl"); info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        else:
            shutil.copy(source, os.path.join(stub_dir, "uploaded.tar.gz"))
    elif "ssh" in args:
        command = [a for a in args if a.startswith("--command=")][0]
        marker = os.path.join(stub_dir, "failed_once")
        if "mlmjax.train" in command and os.environ.get("STUB_FAIL_TRAIN_ONCE") and not os.path.exists(marker):
            open(marker, "w").close()
            sys.exit(255)  # what a preempted worker's ssh session gives
elif name == "scontrol":
    if args[:2] == ["show", "hostnames"]:
        print("gpu-node-07\ngpu-node-08")
elif name == "srun":
    while args and args[0].startswith("--"):
        args = args[1:]
    import signal
    for rank in range(int(os.environ.get("STUB_TASKS", "2"))):
        task = subprocess.Popen(args, env={**os.environ, "SLURM_PROCID": str(rank)})
        signal.signal(signal.SIGTERM, lambda *a: task.send_signal(signal.SIGTERM))  # as srun forwards it
        if task.wait():
            sys.exit(task.returncode)
elif name == "python":  # the training, as srun starts it
    if os.environ.get("STUB_TRAIN_SLEEPS"):
        import signal, time
        signal.signal(signal.SIGTERM, lambda *a: (open(os.path.join(stub_dir, "sigterm"), "w").close(), sys.exit(0)))
        open(os.path.join(stub_dir, "started"), "w").close()
        time.sleep(60)
'''


def _stub_bin(tmp_path):
    folder = tmp_path / "bin"
    if not folder.exists():
        folder.mkdir()
        for name in ("gcloud", "scontrol", "srun", "python"):
            (folder / name).write_text(STUB.replace("PYTHON", sys.executable, 1))
            (folder / name).chmod(0o755)
    return folder


def _calls(tmp_path):
    path = tmp_path / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _option(args, name):
    return next(a.split("=", 1)[1] for a in args if a.startswith(name + "="))


# ---------------------------------------------------------------------------------------------------
# TPU pod


OVERRIDES = ["--config.mlm.weight=0", "--config.sample_prompts=('a {} in the snow',)"]


def _tpu(tmp_path, *options, env=None):
    stubs = _stub_bin(tmp_path)
    return _run([os.path.join(LAUNCH, "tpu_pod.sh"), "--name", "pod1", "--zone", "europe-west4-a",
                 "--accelerator", "v5litepod-16", "--version", "v2-alpha-tpuv5-lite", "--results",
                 str(tmp_path / "results"), *options, "configs/ti.py", "/mnt/share/ti", *OVERRIDES],
                env={"PATH": f"{stubs}:{os.environ['PATH']}", "STUB_LOG": str(tmp_path / "calls.jsonl"),
                     "TPU_RETRY_SLEEP": "0", **(env or {})})


def _train_commands(calls):
    return [shlex.split(_option(c["args"], "--command")) for c in calls
            if c["cmd"] == "gcloud" and "ssh" in c["args"] and "mlmjax.train" in _option(c["args"], "--command")]


def test_tpu_dry_run_prints_and_runs_nothing(tmp_path):
    result = _tpu(tmp_path, "--dry-run", "--spot")
    assert result.returncode == 0, result.stderr
    assert _calls(tmp_path) == []
    lines = result.stdout.splitlines()
    create = next(line for line in lines if line.startswith("gcloud") and " create " in line)
    assert create == ("gcloud compute tpus tpu-vm create pod1 --zone=europe-west4-a "
                      "--accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite --spot")
    assert any(" scp " in line and "--worker=all" in line for line in lines)
    train = [shlex.split(line) for line in lines if "mlmjax.train" in line]
    assert len(train) == 1 and "--worker=all" in train[0]
    remote = shlex.split(_option(train[0], "--command"))
    assert remote[remote.index("-m") + 1:] == ["mlmjax.train", "--config", "configs/ti.py", "--workdir",
                                                "/mnt/share/ti", "--distributed", *OVERRIDES]


def test_tpu_creates_copies_installs_trains_and_fetches(tmp_path):
    result = _tpu(tmp_path, "--spot", "--delete", "--project", "my-proj")
    assert result.returncode == 0, result.stderr
    calls = [c["args"] for c in _calls(tmp_path)]
    verbs = [args[3] for args in calls]
    assert verbs == ["describe", "create", "scp", "ssh", "ssh", "ssh", "scp", "delete"]
    for args in calls:
        assert args[:3] == ["compute", "tpus", "tpu-vm"] and "--zone=europe-west4-a" in args
        assert "--project=my-proj" in args
    create = calls[1]
    assert "--accelerator-type=v5litepod-16" in create and "--spot" in create and "pod1" in create
    upload, install = calls[2], calls[3]
    assert "--worker=all" in upload and "--worker=all" in install
    with tarfile.open(tmp_path / "uploaded.tar.gz") as tar:  # this checkout, as the workers get it
        names = set(tar.getnames())
    assert {"setup.py", "mlmjax/train.py", "configs/ti.py", "launch/tpu_pod.sh"} <= names
    assert not any(name.startswith(".git/") for name in names)
    assert "uv pip install" in _option(install, "--command") and "jax[tpu]" in _option(install, "--command")
    (train,) = _train_commands(_calls(tmp_path))
    assert "--worker=all" in calls[4]
    assert train[train.index("-m") + 1:] == ["mlmjax.train", "--config", "configs/ti.py", "--workdir",
                                              "/mnt/share/ti", "--distributed", *OVERRIDES]
    assert "--worker=0" in calls[5] and "--worker=0" in calls[6]
    assert "--quiet" in calls[7]
    assert (tmp_path / "results" / "metrics.jsonl").read_text().startswith('{"step": 3')
    assert not (tmp_path / "results" / "results.tar.gz").exists()


def test_tpu_reuses_a_ready_slice_and_recreates_a_preempted_one(tmp_path):
    result = _tpu(tmp_path, "--skip_setup", env={"STUB_TPU_STATE": "READY"})
    assert result.returncode == 0, result.stderr
    assert [c["args"][3] for c in _calls(tmp_path)] == ["describe", "ssh", "ssh", "scp"]
    (tmp_path / "calls.jsonl").unlink()
    result = _tpu(tmp_path, "--skip_setup", env={"STUB_TPU_STATE": "PREEMPTED"})
    assert result.returncode == 0, result.stderr
    assert [c["args"][3] for c in _calls(tmp_path)] == ["describe", "delete", "create", "ssh", "ssh", "scp"]


def test_tpu_retries_a_failed_run_with_the_same_command(tmp_path):
    env = {"STUB_TPU_STATE": "READY", "STUB_FAIL_TRAIN_ONCE": "1"}
    result = _tpu(tmp_path, "--skip_setup", env=env)
    assert result.returncode == 255 and "rerun the same command to resume" in result.stderr
    (tmp_path / "calls.jsonl").unlink()
    (tmp_path / "failed_once").unlink()
    result = _tpu(tmp_path, "--skip_setup", "--retries", "1", env=env)
    assert result.returncode == 0, result.stderr
    first, second = _train_commands(_calls(tmp_path))
    assert first == second


# ---------------------------------------------------------------------------------------------------
# SLURM


def _slurm(tmp_path, env=None, wait=True):
    stubs = _stub_bin(tmp_path)
    full_env = {"PATH": f"{stubs}:{os.environ['PATH']}", "STUB_LOG": str(tmp_path / "calls.jsonl"),
                "SLURM_JOB_ID": "31337", "SLURM_JOB_NODELIST": "gpu-node-[07-08]", "SLURM_NTASKS": "2",
                "SLURM_SUBMIT_DIR": REPO, "MLMJAX_PYTHON": str(stubs / "python"), **(env or {})}
    command = ["bash", os.path.join(LAUNCH, "gpu_multinode.sh"), "configs/ti.py", "/shared/ti", *OVERRIDES]
    if wait:
        return _run(command, env=full_env, cwd=str(tmp_path))  # sbatch runs a copy elsewhere: not from the repo
    return subprocess.Popen(command, cwd=str(tmp_path), env={**os.environ, **full_env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_slurm_coordinator_from_first_node_and_one_process_per_task(tmp_path):
    result = _slurm(tmp_path)
    assert result.returncode == 0, result.stderr
    calls = _calls(tmp_path)
    assert calls[0]["cmd"] == "scontrol" and calls[0]["args"] == ["show", "hostnames", "gpu-node-[07-08]"]
    srun = calls[1]
    assert srun["cmd"] == "srun" and "--ntasks=2" in srun["args"] and "--kill-on-bad-exit=1" in srun["args"]
    trains = [c for c in calls if c["cmd"] == "python"]
    assert [c["procid"] for c in trains] == ["0", "1"]
    port = str(12000 + 31337 % 20000)
    for rank, call in enumerate(trains):
        assert call["args"] == ["-m", "mlmjax.train", "--config", "configs/ti.py", "--workdir", "/shared/ti",
                                *OVERRIDES, "--distributed", "--coordinator_address", f"gpu-node-07:{port}",
                                "--num_processes", "2", "--process_id", str(rank)]
    assert not any(c["cmd"] == "scontrol" and c["args"][0] == "requeue" for c in calls)


def test_slurm_port_and_tasks_from_the_environment(tmp_path):
    result = _slurm(tmp_path, env={"MLMJAX_PORT": "23456", "SLURM_NTASKS": "3", "STUB_TASKS": "3"})
    assert result.returncode == 0, result.stderr
    trains = [c["args"] for c in _calls(tmp_path) if c["cmd"] == "python"]
    assert len(trains) == 3 and all("gpu-node-07:23456" in args and args[-3] == "3" for args in trains)


def test_slurm_time_limit_stops_the_run_and_requeues(tmp_path):
    process = _slurm(tmp_path, env={"STUB_TRAIN_SLEEPS": "1", "STUB_TASKS": "1"}, wait=False)
    try:
        deadline = time.time() + 30
        while not (tmp_path / "started").exists():
            assert time.time() < deadline and process.poll() is None, process.communicate()
            time.sleep(0.1)
        process.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends before the time limit
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert (tmp_path / "sigterm").exists(), "the training must get SIGTERM (it saves a checkpoint)"
    assert {"cmd": "scontrol", "args": ["requeue", "31337"], "procid": None} in _calls(tmp_path)


# ---------------------------------------------------------------------------------------------------
# local.sh


def test_local_runs_train_with_the_arguments(tmp_path):
    stubs = _stub_bin(tmp_path)
    result = _run([os.path.join(LAUNCH, "local.sh"), "configs/ti.py", "/tmp/x", *OVERRIDES],
                  env={"MLMJAX_PYTHON": str(stubs / "python"), "STUB_LOG": str(tmp_path / "calls.jsonl")})
    assert result.returncode == 0, result.stderr
    (call,) = _calls(tmp_path)
    assert call["args"] == ["-m", "mlmjax.train", "--config", "configs/ti.py", "--workdir", "/tmp/x", *OVERRIDES]


# ---------------------------------------------------------------------------------------------------
# gpu_bench.sh


GPU_BENCH = os.path.join(LAUNCH, "gpu_bench.sh")


def test_gpu_bench_syntax_help_and_usage_errors(tmp_path):
    assert _run(["bash", "-n", GPU_BENCH]).returncode == 0 and os.access(GPU_BENCH, os.X_OK)
    help_text = _run([GPU_BENCH, "--help"])
    assert help_text.returncode == 0 and "OUT_DIR [BENCHMARK ...]" in help_text.stdout
    assert "set -uo" not in help_text.stdout  # the header comment only
    assert _run([GPU_BENCH]).returncode == 2
    unknown = _run([GPU_BENCH, str(tmp_path / "out"), "dreambooth_off", "sd3"])
    assert unknown.returncode == 2 and "unknown benchmark 'sd3'" in unknown.stderr
    assert not (tmp_path / "out").exists(), "a usage error must not create the output folder"


def test_gpu_bench_runs_the_attention_check_then_each_benchmark_named(tmp_path):
    stubs = _stub_bin(tmp_path)
    (stubs / "nvidia-smi").write_text("#!/bin/sh\necho 'Test GPU, 80 GiB, 1.0'\n")
    (stubs / "nvidia-smi").chmod(0o755)
    out = tmp_path / "out"
    result = _run([GPU_BENCH, str(out), "dreambooth_off", "dreambooth_off_chunked"],
                  env={"PATH": f"{stubs}:{os.environ['PATH']}", "MLMJAX_PYTHON": str(stubs / "python"),
                       "STUB_LOG": str(tmp_path / "calls.jsonl")})
    assert result.returncode == 0, result.stderr
    calls = [call["args"] for call in _calls(tmp_path)]
    assert calls[0][0] == "-c" and calls[1][:3] == ["-m", "pytest", "-q"] and calls[1][-2:] == ["-k", "cudnn"]
    common = ["-m", "mlmjax.bench", "--size", "sd15", "--compute_dtype", "bfloat16", "--repeats", "10", "--warmup", "3",
              "--timeout", "300"]
    profile = ["--profile", f"{out}/profile"]
    assert calls[2] == [*common, "--json", f"{out}/dreambooth_off.json", *profile, "--methods", "dreambooth", "--mlm",
                        "off"]
    assert calls[3] == [*common, "--json", f"{out}/dreambooth_off_chunked.json", *profile, "--methods", "dreambooth",
                        "--mlm", "off", "--framework", "jax", "--attention", "chunked"]
    assert len(calls) == 4
    log = (out / "log.txt").read_text()
    assert "Test GPU" in log and "== dreambooth_off: exit status 0" in log


# ---------------------------------------------------------------------------------------------------
# sweep.py: units


def test_split_values_keeps_tuples_together():
    assert sweep.split_values("0,1e-5") == ["0", "1e-5"]
    assert sweep.split_values("('a {}', 'b {}'),()") == ["('a {}', 'b {}')", "()"]
    assert sweep.split_values("'x,y',z") == ["'x,y'", "z"]
    with pytest.raises(sweep.UsageError):
        sweep.split_values("(a,b")


def test_parse_grid_and_expand():
    axes, settings = sweep.parse_grid(["method=ti,xti", "config.mlm.weight=0,1e-5", "seed=0,1"],
                                      ["max_steps=3001"])
    assert axes == [("method", ["ti", "xti"]), ("mlm.weight", ["0", "1e-5"]), ("seed", ["0", "1"])]
    assert settings == [("max_steps", "3001")]
    runs = sweep.expand(axes)
    assert len(runs) == 8
    assert runs[0] == [("method", "ti"), ("mlm.weight", "0"), ("seed", "0")]
    assert runs[1] == [("method", "ti"), ("mlm.weight", "0"), ("seed", "1")]  # the last axis varies fastest
    assert sweep.expand([]) == [[]]


@pytest.mark.parametrize("grid, fixed, message", [
    (["mlm.weight"], [], "expected KEY=VALUE"),
    (["=1,2"], [], "expected KEY=VALUE"),
    (["mlm weight=1"], [], "expected KEY=VALUE"),
    (["seed=0,,1"], [], "an empty value"),
    (["seed=0,0"], [], "listed twice"),
    (["seed=0", "seed=1"], [], "given twice"),
    (["seed=0,1"], ["seed=3"], "given twice"),
])
def test_parse_grid_errors(grid, fixed, message):
    with pytest.raises(sweep.UsageError, match=message):
        sweep.parse_grid(grid, fixed)


def test_run_names_are_readable_deterministic_and_distinct():
    name = sweep.run_name([("method", "ti"), ("mlm.weight", "1e-5"), ("seed", "0")])
    assert name == "method=ti,mlm.weight=1e-5,seed=0"
    assert sweep.run_name([]) == "default"
    odd = sweep.run_name([("sample_prompts", "('a {} on /tmp',)")])
    assert "/" not in odd and " " not in odd and odd.startswith("sample_prompts=a_")
    assert odd == sweep.run_name([("sample_prompts", "('a {} on /tmp',)")])
    assert odd != sweep.run_name([("sample_prompts", "('a {} on _tmp',)")])
    assert sweep.run_name([("sample_prompts", "()")]).startswith("sample_prompts=empty-")


def test_plan_uses_the_method_config_file_and_validates():
    axes, settings = sweep.parse_grid(["method=ti,xti", "mlm.weight=0,1e-5"], ["max_steps=7"])
    runs = sweep.plan("configs/ti.py", "/root/sweep", axes, settings)
    assert [run.config_file for run in runs] == ["configs/ti.py"] * 2 + ["configs/xti.py"] * 2
    assert runs[3].config["method"] == "xti" and runs[3].config["mlm"]["weight"] == 1e-5
    assert runs[3].config["max_steps"] == 7 and runs[3].overrides == [("mlm.weight", "1e-5"), ("max_steps", "7")]
    assert runs[0].workdir == "/root/sweep/method=ti,mlm.weight=0"
    command = sweep.train_command(runs[3], [])
    assert command[1:] == ["-m", "mlmjax.train", "--config", "configs/xti.py", "--workdir",
                           "/root/sweep/method=xti,mlm.weight=1e-5", "--config.mlm.weight=1e-5", "--config.max_steps=7"]
    assert sweep.train_command(runs[0], ["launch/local.sh"]) == [
        "launch/local.sh", "configs/ti.py", "/root/sweep/method=ti,mlm.weight=0", "--config.mlm.weight=0",
        "--config.max_steps=7"]


@pytest.mark.parametrize("args, message", [
    (["--grid", "mlm.wieght=0,1e-5"], "mlm.wieght: configs/ti.py has no such config key; did you mean mlm.weight?"),
    (["--grid", "mlm.weight=0,abc"], "could not convert string to float: 'abc'"),
    (["--grid", "mlm.weight=0,-1"], "config.mlm.weight=-1.0: must be non-negative"),
    (["--set", "sample_prompts=('no slot',)"], "needs a {} slot"),
    (["--grid", "method=ti,nope"], "no config file configs/nope.py"),
    (["--grid", "seed"], "expected KEY=VALUE"),
    (["--jobs", "0"], "--jobs 0"),
])
def test_sweep_refuses_bad_overrides_before_writing(args, message, tmp_path, capsys):
    root = tmp_path / "sweep"
    assert sweep.main(["--config", "configs/ti.py", "--root", str(root), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert not root.exists()


def test_sweep_dry_run_prints_commands_only(tmp_path, capsys):
    root = tmp_path / "sweep"
    assert sweep.main(["--config", "configs/ti.py", "--root", str(root), "--grid", "seed=0,1", "--dry-run",
                       "--launcher", "launch/local.sh"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"launch/local.sh configs/ti.py {root}/seed={seed} --config.seed={seed}" for seed in (0, 1)]
    assert not root.exists()


FAKE_TRAIN = r"""#!/usr/bin/env bash
# A launcher standing in for training: CONFIG WORKDIR overrides; fails for seed=1.
config=$1 workdir=$2; shift 2
steps=3 seed=0
for a in "$@"; do case $a in --config.max_steps=*) steps=${a#*=};; --config.seed=*) seed=${a#*=};; esac; done
if [ "$seed" = 1 ]; then echo "error: something went wrong in $workdir" >&2; exit 3; fi
mkdir -p "$workdir"
loss="\"loss\": 0.$((seed + 2)), \"loss_diff\": 0.$((seed + 1)), \"loss_mlm\": 4.5, \"mlm_accuracy\": 0.25"
echo "{\"step\": $steps, $loss}" > "$workdir/metrics.jsonl"
"""


def test_sweep_reports_a_failing_run_goes_on_and_exits_nonzero(tmp_path, capsys):
    launcher = tmp_path / "fake_train.sh"
    launcher.write_text(FAKE_TRAIN)
    launcher.chmod(0o755)
    root = tmp_path / "sweep"
    code = sweep.main(["--config", "configs/ti.py", "--root", str(root), "--grid", "seed=0,1,2",
                       "--grid", "mlm.weight=0,1e-5", "--set", "max_steps=4", "--launcher", str(launcher)])
    assert code == 1
    results = json.loads((root / "results.json").read_text())
    status = {row["name"]: row["status"] for row in results["runs"]}
    assert status == {"seed=0,mlm.weight=0": "finished", "seed=0,mlm.weight=1e-5": "finished",
                      "seed=1,mlm.weight=0": "failed (exit 3)", "seed=1,mlm.weight=1e-5": "failed (exit 3)",
                      "seed=2,mlm.weight=0": "finished", "seed=2,mlm.weight=1e-5": "finished"}
    failed = results["runs"][2]
    assert failed["error"].startswith("error: something went wrong") and failed["steps"] is None
    assert (root / "logs" / "seed=1,mlm.weight=0.log").exists()
    # Grouped over seeds (the finished ones), through evaluate.compare.
    groups = {group["group"]: group for group in results["groups"]}
    assert set(groups) == {"mlm.weight=0", "mlm.weight=1e-5"}
    assert groups["mlm.weight=0"]["runs"] == 2
    assert groups["mlm.weight=0"]["metrics"]["loss"]["mean"] == pytest.approx(0.3)
    assert groups["mlm.weight=0"]["metrics"]["loss"]["std"] == pytest.approx(0.1)
    table = (root / "results.md").read_text()
    assert table in capsys.readouterr().out
    assert "| seed=1,mlm.weight=0 | 1 | 0 | failed (exit 3) |" in table
    assert "| mlm.weight=0 | 2 | 0.3000 ± 0.1000 |" in table


def test_evaluation_scores_are_read_from_each_run(tmp_path):
    workdir = tmp_path / "run"
    (workdir / "eval" / "step_4").mkdir(parents=True)
    (workdir / "metrics.jsonl").write_text('{"step": 4, "loss": 1.0}\n')
    (workdir / "eval" / "step_4" / "results.json").write_text(json.dumps(
        {"metrics": {"clip_t": {"mean": 0.31, "std_over_prompts": 0.02}, "mlm_accuracy_heldout": {"mean": 0.5}}}))
    run = sweep.Run(name="run", workdir=str(workdir), results=str(workdir), config_file="configs/ti.py", grid={},
                    overrides=[], config={"max_steps": 4}, status="finished")
    assert sweep.evaluation_scores(run) == {"clip_t": 0.31, "mlm_accuracy_heldout": 0.5}
    rows = sweep.results_rows([run], with_evaluation=True)
    assert "| loss | eval.clip_t | eval.mlm_accuracy_heldout |" in sweep.table(rows, None, [])
    groups = sweep.grouped(rows, ["loss"])
    assert groups[0]["metrics"]["eval.clip_t"] == {"mean": 0.31, "std": 0.0, "n": 1}
    assert "| all | 1 | 1.0000 ± 0.0000 | 0.3100 ± 0.0000 | 0.5000 ± 0.0000 |" in sweep.table(rows, groups, [])


def test_finished_earlier_needs_the_same_config_and_max_steps(tmp_path):
    axes, settings = sweep.parse_grid(["mlm.weight=0"], ["max_steps=4", "sample_prompts=()"])
    (run,) = sweep.plan("configs/ti.py", str(tmp_path), axes, settings)
    workdir = tmp_path / run.name
    (workdir / "checkpoints" / "4").mkdir(parents=True)
    (workdir / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 4, "loss": 1.0}\n')
    saved = json.loads(json.dumps(run.config))
    saved.update(resolution=32, pretrained="/somewhere/model", log_every=1)  # filled in / resumable
    saved["concept"]["class_noun"] = "teapot"
    (workdir / "config.json").write_text(json.dumps(saved))
    assert sweep.finished_earlier(run)
    saved["mlm"]["weight"] = 1e-5  # another run in that workdir: mlmjax.train decides (and refuses)
    (workdir / "config.json").write_text(json.dumps(saved))
    assert not sweep.finished_earlier(run)
    saved["mlm"]["weight"] = 0.0
    (workdir / "config.json").write_text(json.dumps(saved))
    run.config["max_steps"] = 6  # a longer run: resumed by mlmjax.train
    assert not sweep.finished_earlier(run)


# ---------------------------------------------------------------------------------------------------
# sweep.py: a real tiny sweep


def test_tiny_sweep_trains_tables_and_skips_on_rerun(tmp_path):
    root = tmp_path / "sweep"
    command = [sys.executable, os.path.join(LAUNCH, "sweep.py"), "--config", "configs/ti.py", "--root", str(root),
               "--grid", "mlm.weight=0,1e-5", "--set", "max_steps=2", "--set", "log_every=1",
               "--set", "sample_prompts=()", "--set", "checkpoint.every=0"]
    result = _run(command, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((root / "results.json").read_text())
    rows = {row["name"]: row for row in results["runs"]}
    assert set(rows) == {"mlm.weight=0", "mlm.weight=1e-5"}
    for row in rows.values():
        assert row["status"] == "finished" and row["action"] == "ran" and row["steps"] == 2
    assert "loss_mlm" not in rows["mlm.weight=0"]["metrics"]
    assert 0 <= rows["mlm.weight=1e-5"]["metrics"]["mlm_accuracy"] <= 1
    table = (root / "results.md").read_text()
    assert table.count("| finished | 2/2 |") == 2 and table in result.stdout
    metrics = {name: (root / name / "metrics.jsonl").read_text() for name in rows}

    start = time.perf_counter()
    result = _run(command, timeout=300)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("finished earlier, skipped") == 2
    assert all(row["action"] == "skipped" for row in json.loads((root / "results.json").read_text())["runs"])
    assert {name: (root / name / "metrics.jsonl").read_text() for name in rows} == metrics
    assert seconds < 60, f"a rerun of a finished sweep took {seconds:.0f} s"
