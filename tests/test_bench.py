"""``python -m mlmjax.bench`` at the tiny size: complete rows, and a PyTorch reference that is the same step.

Never a timed test: nothing here asserts a speed. The CLI run compiles two tiny TI steps (MLM on and
off); with the session's compilation cache warm it takes about a minute on a busy 2-core machine.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from mlmjax import bench_report

NUMBERS = ("median_ms", "min_ms", "max_ms", "q1_ms", "q3_ms", "examples_per_s", "flops", "achieved_flops_per_s",
           "peak_fraction", "peak_memory_bytes", "peak_rss_bytes")


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "mlmjax.bench", "--methods=ti", "--mlm=on,off", "--size=tiny", "--repeats=2",
         "--warmup=1", "--framework=jax,torch", "--torch_threads=1", "--peak_repeats=3", "--compilation_cache", f"--json={out}",
         f"--profile={out.parent / 'profile'}", "--markdown"], capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


def test_profiled_steps_say_where_their_time_goes(tiny_result):
    """``--profile``: each JAX row's traced steps, summed by kind of operation and by model and pass."""
    result, markdown = tiny_result
    profiles = {r["mlm"]: r["profile"] for r in result["rows"] if r["framework"] == "jax"}
    for mlm, profile in profiles.items():
        assert profile["where"] == "host" and os.path.isfile(profile["trace"])
        # On a CPU each operation is charged until the next one starts: the charges make up the wall time
        # but for the Python between steps.
        assert 0.8 * profile["wall_ms_per_step"] < profile["op_ms_per_step"] < 1.1 * profile["wall_ms_per_step"]
        assert profile["by_category"]["convolution"] > 0 and profile["by_category"]["matmul"] > 0
        scopes = profile["by_scope"]
        for scope in ("UNet2DConditionModel forward", "UNet2DConditionModel backward", "CLIPTextModel forward"):
            assert scopes[scope] > 0, scope
        assert ("Contextualizer forward" in scopes) == mlm
    # MLM's own operations: the contextualizer and the vocabulary projection's chunks.
    assert profiles[True]["by_scope"]["Contextualizer backward"] > 0
    assert profiles[True]["by_scope"]["mlm._chunked_statistics"] > 0
    assert any(layer.startswith("UNet2DConditionModel resnets/conv") for layer in profiles[False]["by_layer"])
    assert "| JAX step profiled |" in markdown and "costliest scopes" in markdown and "costliest layers" in markdown


def test_rows_have_positive_finite_fields(tiny_result):
    result, _ = tiny_result
    rows = result["rows"]
    assert {(r["framework"], r["mlm"]) for r in rows} == {(f, m) for f in ("jax", "torch") for m in (True, False)}
    for row in rows:
        assert not row.get("error"), row
        for field in bench_report.ROW_FIELDS:
            assert field in row, (field, row)
        for field in NUMBERS:
            assert _positive(row[field]), (field, row)
        assert row["batch"] == 4 and row["examples_per_step"] == 4
        assert len(row["times_s"]) == 2
    for row in rows:
        if row["framework"] == "jax":
            assert _positive(row["compile_s"]) and _positive(row["time_ratio_jax_over_torch"])
            assert row["peak_memory_bytes"] == row["memory"]["peak_bytes"]
            # The model's FLOPs: the compiled count misses all but one chunk of the MLM cross-entropy.
            assert (row["flops"] > 1.05 * row["flops_compiled"]) if row["mlm"] else (
                row["flops"] == pytest.approx(row["flops_compiled"], rel=0.02))
    machine = result["machine"]
    assert machine["cores"] >= 1 and machine["cpu"] and machine["versions"]["jax"] and machine["versions"]["torch"]
    assert _positive(result["matmul_peak"]["flops_per_s"])


def test_mlm_adds_flops_and_both_projection_variants_are_reported(tiny_result):
    result, _ = tiny_result
    jax_rows = {r["mlm"]: r for r in result["rows"] if r["framework"] == "jax"}
    assert jax_rows[True]["flops"] > jax_rows[False]["flops"]
    assert jax_rows[True]["mlm_batch"] == 25 and jax_rows[False]["mlm_batch"] == 0
    (entry,) = [e for e in result["mlm"] if e["framework"] == "jax"]
    assert 0 < entry["mlm_flops_masked"] < entry["mlm_flops_all_positions"]
    assert entry["mlm_positions_masked"] < entry["mlm_positions_all"] == 25 * 77
    # The all-positions variant adds the vocabulary projection at the extra rows: 4·D·V FLOPs each
    # (forward and the backward into the features), plus a softmax over V.
    extra = entry["mlm_flops_all_positions"] - entry["mlm_flops_masked"]
    projection = entry["projection_flops_all_positions"] - entry["projection_flops_masked"]
    assert projection <= extra <= 1.2 * projection


def test_pytorch_reference_is_the_same_step(tiny_result):
    """Same weights, batch and random draws: the first losses (and their parts) agree."""
    result, _ = tiny_result
    for mlm in (True, False):
        jax_row, torch_row = (next(r for r in result["rows"] if r["framework"] == f and r["mlm"] == mlm)
                              for f in ("jax", "torch"))
        assert set(jax_row["first_loss"]) == set(torch_row["first_loss"]) == (
            {"loss", "loss_diff", "loss_mlm"} if mlm else {"loss", "loss_diff"})
        assert jax_row["loss_rel_error"] <= 1e-4, (jax_row["first_loss"], torch_row["first_loss"])
        assert jax_row["trainable_params"] == torch_row["trainable_params"] == 32  # the token: [1, 32]


def test_markdown_renders(tiny_result):
    result, stdout = tiny_result
    assert "| tiny | ti | on | jax |" in stdout and "| tiny | ti | off | torch |" in stdout
    assert bench_report.markdown(result) in stdout
    assert "GFLOP/s" in stdout and result["machine"]["cpu"] in stdout


def test_markdown_shows_failures_and_sharded_rows():
    machine = {"cpu": "test cpu", "cores": 2, "load_average": [1.0, 1.0, 1.0], "load_average_end": [2.0, 2.0, 2.0],
               "versions": {"jax": "0"}, "xla_flags": "", "date": "today"}
    row = {field: None for field in bench_report.ROW_FIELDS}
    row.update(method="ti", mlm=True, size="sd15", framework="torch", error="killed (out of memory?)")
    profiled = dict(row, framework="jax", method="dreambooth", error=None, median_ms=80.0, q1_ms=79.0, q3_ms=81.0,
                    batch=1, prior_batch=1, mlm_batch=0, profile={
                        "where": "device", "wall_ms_per_step": 82.0, "op_ms_per_step": 75.5,
                        "unmatched_device_ms_per_step": 1.25, "by_category": {"convolution": 40.0, "matmul": 35.5},
                        "by_scope": {"UNet2DConditionModel backward": 50.0}, "by_layer": {"optimizer.adamw": 9.0}})
    sharded = {"method": "dreambooth", "mlm": False, "devices": 8, "compute_dtype": "bfloat16", "batch": 8, "prior_batch": 8,
               "peak_bytes_per_device": 12 * 2**30, "memory_per_device": {"argument": 2**30, "temp": 2**31},
               "compile_s": 100.0}
    text = bench_report.markdown({"machine": machine,
                                  "matmul_peak": {"jax": {"flops_per_s": 5e10}, "flops_per_s": 5e10},
                                  "rows": [row, profiled], "mlm": [], "sharded_memory": [sharded]})
    assert "failed: killed (out of memory?)" in text
    assert ("| sd15 dreambooth MLM on | device (+1.2 ms of other kernels) | 82.0 | 75.5 | – | 40.0 | 35.5 | – |"
            in text)
    assert "| sd15 dreambooth MLM on | UNet2DConditionModel backward 50.0 |" in text
    assert "| sd15 dreambooth MLM on | optimizer.adamw 9.0 |" in text
    assert "| dreambooth | off | bfloat16 | fsdp=8 | 8 (+8) | 12.00 |" in text
    assert "jax 50.0 GFLOP/s" in text


def test_processes_pool_their_steps_and_keep_each_median():
    first = {"framework": "jax", "compile_s": 9.0, "times_s": [0.030, 0.028, 0.029], "mlm_branch_times_s": [0.01]}
    second = {"framework": "jax", "compile_s": 8.0, "times_s": [0.040, 0.041], "mlm_branch_times_s": [0.02, 0.03]}
    pooled, error = bench_report.pool_processes([(first, None), (None, "exit status 1: boom"), (second, None)])
    assert error is None and pooled["compile_s"] == 9.0  # the first process's row
    assert pooled["times_s"] == [0.030, 0.028, 0.029, 0.040, 0.041]
    assert pooled["mlm_branch_times_s"] == [0.01, 0.02, 0.03]
    assert pooled["process_medians_ms"] == pytest.approx([29.0, 40.5])
    assert pooled["process_errors"] == ["exit status 1: boom"]
    # None succeeded: the first failure, as one process would report it.
    partial = {"framework": "jax", "compile_s": 9.0, "error": "timed out after 5 s"}
    assert bench_report.pool_processes([(partial, "timed out after 5 s"), (None, "exit status 1: boom")]) == (
        partial, "timed out after 5 s")
    assert bench_report.pool_processes([(first, None)])[0]["process_medians_ms"] == pytest.approx([29.0])

    row = bench_report.finish_row(pooled, {"method": "ti", "mlm": True, "size": "tiny", "compute_dtype": "float32"},
                                  None, None)
    assert row["median_ms"] == pytest.approx(30.0)
    result = _result(True, 1.0, 1.0)
    result["rows"] = [dict(row, batch=4, prior_batch=0, mlm_batch=25)]
    assert "| 4 (+0, 25) | 30.0 [29.0–40.0]; 2 processes 29.0–40.5 |" in bench_report.markdown(result)


def test_each_configuration_runs_in_several_processes(tmp_path):
    """``--processes 2``: two fresh JAX processes per configuration, their steps pooled, one profile. A
    method's own ``--cpu_devices`` count stands over the one for every method (here TI's one device)."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "mlmjax.bench", "--methods=ti", "--mlm=off", "--repeats=2", "--warmup=1",
         "--framework=jax", "--processes=2", "--peak_repeats=2", "--cpu_devices=2,ti=0", "--compilation_cache",
         f"--json={out}",
         f"--profile={tmp_path / 'profile'}"], capture_output=True, text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert len(row["times_s"]) == 4 and len(row["process_medians_ms"]) == 2 and row["cpu_devices"] == 1
    assert all(_positive(median) for median in row["process_medians_ms"]) and row["profile"]
    traces = [name for _, _, names in os.walk(tmp_path / "profile") for name in names if name.endswith(".xplane.pb")]
    assert len(traces) == 1, traces  # only the first process profiles
    assert "ti mlm=False, process 2 of 2: jax " in proc.stderr
    refused = subprocess.run([sys.executable, "-m", "mlmjax.bench", "--processes=0"], capture_output=True, text=True,
                             env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert refused.returncode == 2 and "--processes=0" in refused.stderr, refused.stderr


def test_each_jax_subprocess_gets_the_devices_its_flag_asks_for():
    from mlmjax import bench

    flag = "--xla_force_host_platform_device_count"
    user = {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false", "PATH": "/bin"}
    counts = bench._parse_cpu_devices("2,dreambooth=1")
    assert counts == {"": 2, "dreambooth": 1} and bench._parse_cpu_devices("0") == {"": 0}
    methods = ["ti", "dreambooth", "custom_diffusion"]
    timed, sharded = bench._jax_environments(user, {"methods": methods, "cpu_devices": counts,
                                                    "sharded_memory": True, "sharded_devices": 8})
    assert timed == {"ti": dict(user, XLA_FLAGS=f"--xla_cpu_enable_fast_math=false {flag}=2"),
                     "dreambooth": dict(user, XLA_FLAGS=f"--xla_cpu_enable_fast_math=false {flag}=1"),
                     "custom_diffusion": dict(user, XLA_FLAGS=f"--xla_cpu_enable_fast_math=false {flag}=2")}
    assert sharded == dict(user, XLA_FLAGS=f"--xla_cpu_enable_fast_math=false {flag}=8")
    # A method named alone takes its count, the others one device; a plain count is every method's.
    only = {"methods": methods, "cpu_devices": bench._parse_cpu_devices("custom_diffusion=2")}
    assert [bench._cpu_devices(only, m) for m in methods] == [0, 0, 2]
    assert [bench._cpu_devices({"cpu_devices": {"": 2}}, m) for m in methods] == [2, 2, 2]
    # Zero and one sharded device need no flag; --sharded_devices counts only with --sharded_memory.
    for options in ({"cpu_devices": {"": 0}, "sharded_memory": True, "sharded_devices": 1},
                    {"sharded_memory": False, "sharded_devices": 8}):
        assert bench._jax_environments(user, dict(options, methods=["ti"])) == ({"ti": user}, user)
    # The user's own count stands where it agrees, and is an error naming the flag where it does not.
    four = {"XLA_FLAGS": f"{flag}=4"}
    assert bench._jax_environments(four, {"methods": ["ti"], "cpu_devices": {"": 4}, "sharded_memory": True,
                                          "sharded_devices": 4}) == ({"ti": four}, four)
    with pytest.raises(ValueError, match="--sharded_devices=8, but XLA_FLAGS has"):
        bench._jax_environments(four, {"methods": ["ti"], "cpu_devices": {"": 4}, "sharded_memory": True})
    with pytest.raises(ValueError, match=f"^--cpu_devices dreambooth=1, but XLA_FLAGS has {flag}=4"):
        bench._jax_environments(four, {"methods": ["ti", "dreambooth"], "cpu_devices": {"": 4, "dreambooth": 1}})
    for bad, says in (("2,foo=1", "unknown method 'foo'"), ("two", "give a count"), ("", "give a count"),
                      ("ti=1,ti=2", "ti given twice"), ("-1", "give a count"),
                      ("1,2", "the count for every method given twice")):
        with pytest.raises(ValueError, match=f"^--cpu_devices={bad}: {says}"):
            bench._parse_cpu_devices(bad)


def test_bad_flags_are_user_errors():
    proc = subprocess.run([sys.executable, "-m", "mlmjax.bench", "--methods=ti,foo"], capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --methods=ti,foo"), proc.stderr
    proc = subprocess.run([sys.executable, "-m", "mlmjax.bench", "--timeout=0"], capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --timeout=0: give a positive"), proc.stderr
    proc = subprocess.run([sys.executable, "-m", "mlmjax.bench", "--cpu_devices=2,foo=1"], capture_output=True,
                          text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --cpu_devices=2,foo=1: unknown method 'foo'")
    # The user's XLA_FLAGS asking for other devices than a flag does: named, before anything runs.
    four = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    for flags, asked in ((["--cpu_devices=2"], "--cpu_devices=2"),
                         (["--sharded_memory", "--framework=none"], "--sharded_devices=8")):
        proc = subprocess.run([sys.executable, "-m", "mlmjax.bench", *flags], capture_output=True, text=True, env=four,
                              timeout=300)
        assert proc.returncode == 2 and proc.stderr.strip() == (
            f"error: {asked}, but XLA_FLAGS has --xla_force_host_platform_device_count=4: drop one of them"), proc.stderr


@pytest.mark.parametrize("framework, missing", [("jax,torch", "diffusers, grain"), ("jax", "grain")])
def test_missing_packages_fail_before_anything_runs(framework, missing):
    # A bare GPU machine lacked grain: the benchmark must say so at once, not after the matmul peaks.
    hide = ("import runpy, sys; sys.modules['grain'] = sys.modules['diffusers'] = None; "
            f"sys.argv = ['bench', '--methods=ti', '--mlm=off', '--framework={framework}']; "
            "runpy.run_module('mlmjax.bench', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: {sys.executable} cannot import {missing}, which"), proc.stderr
    assert "pip install -e '.[bench]'" in proc.stderr and "matmul peak" not in proc.stderr


def _result(mlm: bool, median_ms: float, flops: float) -> dict:
    machine = {"cpu": "test cpu", "cores": 2, "load_average": [1.0] * 3, "versions": {"jax": "0"}, "xla_flags": "",
               "date": "today", "accelerator": "Test GPU"}
    row = {field: None for field in bench_report.ROW_FIELDS}
    row.update(method="dreambooth", mlm=mlm, size="sd15", framework="jax", batch=1, prior_batch=1,
               mlm_batch=25 if mlm else 0, median_ms=median_ms, q1_ms=median_ms, q3_ms=median_ms,
               examples_per_s=2000 / median_ms, flops=flops)
    return {"machine": machine, "rows": [row], "mlm": [], "sharded_memory": [],
            "matmul_peak": {"jax": {"flops_per_s": 6e14, "dtype": "bfloat16", "size": 8192}, "flops_per_s": 6e14}}


def test_report_merges_runs_and_recomputes_mlm_cost(tmp_path):
    paths = []
    for mlm, median_ms, flops in ((False, 200.0, 4e12), (True, 230.0, 5e12)):
        paths.append(tmp_path / f"{mlm}.json")
        paths[-1].write_text(json.dumps(_result(mlm, median_ms, flops)))
    merged = bench_report.merge([json.loads(p.read_text()) for p in paths])
    (cost,) = merged["mlm"]
    assert math.isclose(cost["extra_time"], 0.15) and math.isclose(cost["extra_flops"], 0.25)
    proc = subprocess.run([sys.executable, "-m", "mlmjax.bench_report", *map(str, paths)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Machine: Test GPU with test cpu" in proc.stdout and "Bfloat16 8192² matmul peak" in proc.stdout
    assert "| sd15 | dreambooth | jax | 25 | +15.0% | +25.0% |" in proc.stdout
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    proc = subprocess.run([sys.executable, "-m", "mlmjax.bench_report", str(bad)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith(f"{bad}: not a benchmark result"), proc.stderr


def test_the_mlm_table_sets_the_extra_time_beside_the_branch_alone():
    results = [_result(False, 200.0, 4e12), _result(True, 230.0, 5e12)]
    results[1]["rows"][0]["mlm_branch_times_s"] = [0.050, 0.040, 0.045]
    merged = bench_report.merge(results)
    (cost,) = merged["mlm"]
    assert cost["extra_ms"] == pytest.approx(30.0) and cost["branch_alone_ms"] == pytest.approx(45.0)
    text = bench_report.markdown(merged)
    assert "| extra ms / branch alone ms |" in text and "| 30.0 / 45.0 |" in text
    del results[1]["rows"][0]["mlm_branch_times_s"]  # not asked for: no such column
    assert "branch alone" not in bench_report.markdown(bench_report.merge(results))


def test_a_worker_cut_off_by_the_timeout_keeps_what_it_had_measured():
    from mlmjax import bench

    writes_then_hangs = ("import json, sys, time; out = sys.argv[2]; "
                         "json.dump({'framework': 'jax', 'compile_s': 1.5, 'times_s': [0.2, 0.3]}, "
                         f"open(out + {bench.PARTIAL_SUFFIX!r}, 'w')); time.sleep(60)")
    row, error = bench._worker(["-c", writes_then_hangs], timeout=5)
    assert error == "timed out after 5 s"
    assert row == {"framework": "jax", "compile_s": 1.5, "times_s": [0.2, 0.3], "error": error}
    row, error = bench._worker(["-c", "import time; time.sleep(60)"], timeout=2)
    assert row is None and error == "timed out after 2 s"


def test_flops_counted_on_the_cpu_equal_the_rows_own(tiny_result, tmp_path):
    """Where the step is timed on an accelerator, a CPU subprocess counts the model's FLOPs (XLA's GPU
    client gives no cost analysis of a lowered step): the count must be the one the CPU row made itself."""
    from mlmjax import bench
    from mlmjax import config as config_lib

    result, _ = tiny_result
    (jax_row,) = [r for r in result["rows"] if r["framework"] == "jax" and r["mlm"]]
    assert jax_row["flops_counted_on"] == "cpu" and jax_row["flops_source"].endswith("on cpu")
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"method": "ti", "mlm": True, "size": "tiny", "compute_dtype": "float32",
                                   "configs": config_lib.CONFIGS_DIR, "remat": False}))
    counted, error = bench._worker(bench._jax_worker_args("flops", str(request)), dict(os.environ, JAX_PLATFORMS="cpu"))
    assert error is None, error
    assert counted["flops_counted_on"] == "cpu"
    for key in ("flops", "flops_lowered_masked", "flops_lowered_all_positions", "mlm_positions_masked"):
        assert counted[key] == jax_row[key] > 0, key
