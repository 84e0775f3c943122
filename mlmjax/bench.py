r"""Benchmarks of the train step: JAX against the PyTorch and diffusers-Flax references, per method, with
and without MLM.

    python -m mlmjax.bench                                     # tiny size, 4 methods x MLM on/off, JAX + PyTorch
    python -m mlmjax.bench --methods ti --mlm off --size sd15 --repeats 2 --json sd15.json
    python -m mlmjax.bench --size sd15 --methods ti,dreambooth --markdown   # README table (~21 GB)
    python -m mlmjax.bench --size sd15 --compile_only --methods ti --mlm off   # XLA's memory, no weights
    python -m mlmjax.bench --sharded_memory --methods dreambooth --mlm off --framework none   # fsdp=8 memory
    python -m mlmjax.bench --size sd15 --methods dreambooth --compute_dtype bfloat16 --repeats 10   # on a GPU: MFU
    python -m mlmjax.bench --methods ti,xti --cpu_devices 2   # JAX steps data-parallel over the CPU as 2 devices
    python -m mlmjax.bench --cpu_devices 2,dreambooth=1       # each method on the split that suits it
    python -m mlmjax.bench --framework jax,torch,diffusers_flax \
        --diffusers_flax_python /tmp/mlmjax-diffusers-flax/bin/python   # launch/diffusers_flax_env.sh makes it

Every configuration runs in its own fresh subprocess (JAX and PyTorch separately), so its peak
resident memory is its own. For each it reports: the median step time over ``--repeats`` steps
after ``--warmup`` (with min, max, quartiles), examples/s (UNet rows per step: instance plus class
images), compile time (cold unless ``--compilation_cache``), the model's FLOPs per step (XLA's cost
analysis of the step lowered with every attention whole and the plain vocabulary projection: the
compiled step loops over query and vocabulary chunks, whose bodies XLA's cost analysis counts once;
the compiled count is kept as ``flops_compiled``, one device's share, beside ``flops_lowered``, the
whole step's before XLA splits it over the devices), the achieved FLOP/s and its fraction of this
machine's matrix-multiply peak in the compute dtype (measured in the same run by both frameworks,
2048² on a CPU and 8192² on a GPU, median of 10; the larger is the peak: on a GPU the fraction is the
model FLOP utilisation against what the card sustains), peak memory (JAX: the compiled memory
analysis, argument + output + temporaries - donated aliases; on a GPU both frameworks report their
allocator's peak instead; both: the subprocess's peak RSS), and the JAX/PyTorch time and memory
ratios. PyTorch rows use the JAX step's FLOPs (the same computation). A step timed on an accelerator
has its FLOPs counted afterwards in a CPU subprocess (XLA's GPU client gives no cost analysis of a
lowered step; the count does not depend on the device), as has a JAX side cut off before counting.
On a GPU the PyTorch reference runs there too (``--torch_device``), and the JAX step uses cuDNN's
fused attention for half-precision inputs (``--attention``).

Both frameworks run the same configuration on the same batch (built once by mlmjax's batch function
and handed to PyTorch in a case folder). At the tiny size they also share the weights (the embedded
model and contextualizer, read by both) and the random draws of the first step, so their first losses
must agree: the ``loss_rel_error`` column checks that the reference is the same step. At SD 1.5
shapes the weights are random and not shared (timing and memory do not depend on them); the VAE is
not part of the step (latent moments are precomputed), so none is built: latent moments are random.

``--framework ...,diffusers_flax`` also runs each case with diffusers' and transformers' Flax models
(``mlmjax.bench_diffusers_flax``: what a JAX user would write without mlmjax) in the interpreter
``--diffusers_flax_python`` (those models need diffusers 0.39 and transformers 4; mlmjax needs 5), on the
same case folder; its rows report the compiled memory analysis as the JAX rows do, and XTI/P+, which
diffusers' Flax UNet cannot express, as not run.

With MLM on, the MLM branch's FLOPs are reported twice: with the vocabulary projection only at the
masked positions (what the step does: ``max_masked`` rows) and at every position (M × 77 rows, as the
authors' code computes it), from XLA's cost analysis of the step lowered both ways (not compiled);
the projection alone costs 4·N·D·V FLOPs for N rows (forward 2·N·D·V, backward into the features
2·N·D·V; the weights are frozen). ``mlm`` rows compare MLM's extra time with the extra FLOPs it adds.
These are the model's FLOPs, counted on the step lowered with the plain projection: the step runs
the cross-entropy in vocabulary chunks (``mlm.vocabulary_cross_entropy``), a loop whose body XLA's
cost analysis counts once. With the projection frozen, as here, that loop makes the same 4·N·D·V
FLOPs in one pass (the features' gradient is folded into the forward pass).

``--mlm_branch`` also times, for each MLM row of JAX and diffusers-Flax, the MLM branch alone: the MLM
loss and its gradient with respect to the trained parameters it reaches (all but the UNet's), compiled
on its own. The ``mlm`` table then sets MLM's extra step time beside it: a step whose other work leaves
cores idle hides part of the branch there, and one that keeps them busy pays it in full.

``--profile DIR`` runs three more JAX steps under JAX's profiler after the timed ones and reports where
their time goes (``mlmjax.profiling``): by kind of operation (matmul, convolution, cuDNN attention,
reduction, elementwise, data movement), by scope (each Flax model's forward and backward pass, and
outside the models the function that issued the operation, such as ``mlm._chunked_statistics``) and by
layer (``transformer_blocks/attn1``); the profiles (``.xplane.pb``) stay in DIR for TensorBoard's
profile plugin or XProf.

``--processes N`` times each configuration in N fresh processes of each framework, taken in turns (JAX,
the references, JAX again), and pools their timed steps into the row; the row also keeps each process's
median, and the table shows their range. At the tiny size a step's speed is a property of the process
as much as of the step: the same TI + MLM step runs every step ~35% slower in about one process in eight
(README, "Benchmarks"), so one process per row can land either way.

``--sharded_memory`` lowers DreamBooth at SD 1.5 shapes (UNet + text encoder + token trained, AdamW,
bfloat16 compute, one instance and one class image per device, fsdp=8) from
``jax.ShapeDtypeStruct``\ s with shardings, no weights allocated, in a subprocess with 8 host devices
(``--xla_force_host_platform_device_count=8``), and reports the compiled memory per device.
``--compile_only`` does the same on one device with the method's own batch and ``--compute_dtype``:
XLA's peak memory and FLOPs of an SD 1.5 step on a machine that cannot hold it (nothing is timed).
A JAX step that compiles and then dies (out of memory) keeps its compiled numbers in its row.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

from mlmjax import bench_cases
from mlmjax import bench_report
from mlmjax import bench_torch
from mlmjax import config as config_lib
from mlmjax import runtime
from mlmjax.models import attention

SIZES = ("tiny", "sd15")
REQUEST_JSON = "request.json"
ROW_JSON = "row.json"
PARTIAL_SUFFIX = ".compiled"
# What each framework's subprocess imports beyond jax and numpy. The JAX side always runs (it builds the
# case folder the references read); the diffusers-Flax reference runs in its own interpreter.
WORKER_PACKAGES = {"jax": ("flax", "optax", "ml_collections", "grain", "transformers", "safetensors"),
                   "torch": ("torch", "diffusers", "transformers", "safetensors")}


# ---------------------------------------------------------------------------------------------------
# The driver: one subprocess per configuration


def _worker(args: list[str], env: dict | None = None, timeout: float | None = None,
            python: str | None = None) -> tuple[dict | None, str | None]:
    """Runs ``python args...`` (this interpreter unless ``python`` names another) and reads the row it
    wrote; ``(row, None)`` or ``(None, error)``."""
    with tempfile.TemporaryDirectory(prefix="mlmjax-bench-row-") as tmp:
        out = os.path.join(tmp, ROW_JSON)
        try:
            proc = subprocess.run([python or sys.executable, *args, "--out", out], env=env, capture_output=True,
                                  text=True, timeout=timeout)
            error = None
        except subprocess.TimeoutExpired:
            error = f"timed out after {timeout:g} s"
        if error is None and (proc.returncode or not os.path.isfile(out)):
            lines = (proc.stderr or proc.stdout or "").strip().splitlines()
            reason = "killed (out of memory?)" if proc.returncode in (-9, 137) else (lines[-1] if lines else "")
            error = f"exit status {proc.returncode}: {reason}"[:500]
        if error is not None:
            if os.path.isfile(out + PARTIAL_SUFFIX):  # compiled (and maybe timed), then failed: keep that
                with open(out + PARTIAL_SUFFIX) as f:
                    return {**json.load(f), "error": error}, error
            return None, error
        with open(out) as f:
            return json.load(f), None


def _jax_worker_args(kind: str, request_path: str | None = None) -> list[str]:
    args = ["-m", "mlmjax.bench", f"--worker={kind}"]
    return args + ([f"--request={request_path}"] if request_path else [])


def _missing_packages(frameworks: list[str]) -> list[str]:
    """The packages the benchmark's subprocesses would import that this interpreter cannot find: checked
    before anything runs, so a machine without them (a bare GPU box) fails in a second, not after the
    matmul peaks and a model build."""
    needed = {"jax"} | set(frameworks)
    names = sorted({name for framework in needed for name in WORKER_PACKAGES.get(framework, ())})
    return [name for name in names if importlib.util.find_spec(name) is None]


def _reference_worker(framework: str, case_dir: str, request: dict, options: dict) -> tuple[list[str], str | None]:
    """``(arguments, interpreter)`` of a reference framework's subprocess for one case folder; a JAX
    reference splits the CPU as the case's JAX step does (``request['cpu_devices']``)."""
    timing = [f"--case={case_dir}", f"--warmup={options['warmup']}", f"--repeats={options['repeats']}"]
    if framework == "torch":
        return ["-m", "mlmjax.bench_torch", *timing, *_torch_args(options)], None
    branch = ["--mlm_branch"] if options.get("mlm_branch") else []
    devices = request.get("cpu_devices", 0)
    return (["-m", "mlmjax.bench_diffusers_flax", *timing, *branch, *([f"--cpu_devices={devices}"] if devices else [])],
            options.get("diffusers_flax_python"))


def _torch_args(options: dict) -> list[str]:
    return [f"--threads={options.get('torch_threads', 0)}", f"--device={options.get('torch_device', 'auto')}"]


def _process_median(row: dict | None, error: str | None) -> str:
    if (row or {}).get("unsupported"):
        return "not run"
    median_ms = bench_report.process_median_ms(row, error)
    return f"failed ({error})" if median_ms is None else f"{median_ms:.1f} ms"


def _measure_case(case_dir: str, request: dict, options: dict, env_for, log) -> dict[str, list]:
    """Every framework's ``(row, error)`` for one configuration, from ``options['processes']`` fresh processes
    each, taken in turns (JAX, then each reference, then JAX again), so a drift in the machine's speed
    reaches every framework alike. The JAX process also writes the case folder the references read (the
    same batch and weights each time); without JAX among the frameworks it runs once, only for that. Only
    the first JAX process profiles."""
    processes = options.get("processes", 1)
    references = [f for f in options["frameworks"] if f in bench_report.REFERENCES]
    measured = {framework: [] for framework in ["jax", *references]}
    for process in range(processes):
        if process == 0 or "jax" in options["frameworks"]:
            request_path = os.path.join(case_dir, REQUEST_JSON if process == 0 else f"later-{REQUEST_JSON}")
            if process == 1:
                with open(request_path, "w") as f:
                    json.dump(dict(request, profile=None), f)
            measured["jax"].append(_worker(_jax_worker_args("jax", request_path) + [f"--case={case_dir}"],
                                           env_for("jax"), options.get("timeout")))
        for framework in references:
            if not os.path.isfile(os.path.join(case_dir, bench_torch.CASE_JSON)):
                error = measured["jax"][-1][1]
                measured[framework].append((None, f"no case folder: the JAX side failed ({error})"))
                continue
            args, python = _reference_worker(framework, case_dir, request, options)
            measured[framework].append(_worker(args, env_for(framework), options.get("timeout"), python))
        if processes > 1:
            log(f"{request['method']} mlm={request['mlm']}, process {process + 1} of {processes}: " + ", ".join(
                f"{framework} {_process_median(*results[-1])}" for framework, results in measured.items()
                if len(results) == process + 1))
    return measured


def _parse_cpu_devices(value: str) -> dict[str, int]:
    """``--cpu_devices``: a count for every method (``2``), per method (``dreambooth=1``), or both
    (``2,dreambooth=1``), as ``{method or "": count}``; ValueError naming what is wrong."""
    counts = {}
    for item in (part.strip() for part in value.split(",")):
        method, _, count = item.rpartition("=")
        if method and method not in config_lib.METHODS:
            raise ValueError(f"--cpu_devices={value}: unknown method {method!r}; choose from "
                             f"{','.join(config_lib.METHODS)}")
        if method in counts:
            raise ValueError(f"--cpu_devices={value}: {'the count for every method' if not method else method} "
                             "given twice")
        if not count.isdigit():
            raise ValueError(f"--cpu_devices={value}: give a count of CPU devices (0: one), for every method or "
                             "as METHOD=COUNT (e.g. 2,dreambooth=1)")
        counts[method] = int(count)
    return counts


def _cpu_devices(options: dict, method: str) -> int:
    """``method``'s count of JAX CPU devices in ``options['cpu_devices']`` (:func:`_parse_cpu_devices`'s
    mapping; none: one device, unsplit)."""
    counts = options.get("cpu_devices", {})
    return counts.get(method, counts.get("", 0))


def _jax_environments(environ: dict[str, str], options: dict) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """``environ`` for each method's timed JAX steps and for ``--sharded_memory``'s compiles.
    ``--cpu_devices`` splits the CPU for both timed JAX steps of a method, mlmjax's and diffusers-Flax's
    (each data-parallel over the same devices; PyTorch keeps one process's threads over every core, as
    its users run it); ``--sharded_devices`` gives the fsdp compiles their fake devices, where one needs
    no flag. Raises ValueError, naming the flag, where the user's ``XLA_FLAGS`` ask for another device
    count."""
    def setting(method: str) -> str:  # what the user wrote: --cpu_devices=2, or --cpu_devices dreambooth=1
        return f"--cpu_devices {method}" if method in options.get("cpu_devices", {}) else "--cpu_devices"
    timed = {method: runtime.with_cpu_devices(environ, _cpu_devices(options, method), setting(method))
             for method in options["methods"]}
    devices = options.get("sharded_devices", 8) if options.get("sharded_memory") else 0
    sharded = runtime.with_cpu_devices(environ, devices if devices > 1 else 0, "--sharded_devices")
    return timed, sharded


def run(options: dict) -> dict[str, Any]:
    """The whole benchmark; ``options``: methods, mlm (list of bools), size, repeats, warmup, frameworks,
    compute_dtype, configs, sharded_memory, compilation_cache, profile (a folder: profile the JAX steps),
    processes (fresh processes per configuration and framework), cpu_devices (JAX CPU devices per method,
    as :func:`_parse_cpu_devices` gives them; absent: one device),
    mlm_branch (also time the MLM branch alone), count_flops (default True: count each JAX step's model FLOPs),
    diffusers_flax_python (the interpreter of the diffusers-Flax reference), log (a callable for progress
    lines)."""
    log = options.get("log") or (lambda message: None)
    machine = bench_cases.describe_machine()
    env = dict(os.environ)
    if not options.get("compilation_cache"):
        env["MLMJAX_BENCH_NO_CACHE"] = "1"
    # JAX's processes (mlmjax's and diffusers-Flax's steps alike) run as `python -m mlmjax.train` does,
    # with huge pages for malloc's mappings; PyTorch runs as its users run it.
    xla_env = runtime.huge_page_environment(env) or env

    jax_envs, sharded_env = _jax_environments(xla_env, options)
    count_flops = options.get("count_flops", True)
    peaks = {}
    dtype = options["compute_dtype"]
    for framework in [f for f in options["frameworks"] if f in ("jax", "torch")]:  # diffusers-Flax is JAX
        repeats = options.get("peak_repeats", 10)
        args = (_jax_worker_args("peak") + [f"--peak_repeats={repeats}", f"--compute_dtype={dtype}"]
                if framework == "jax" else
                ["-m", "mlmjax.bench_torch", "--peak", f"--repeats={repeats}", f"--dtype={dtype}",
                 *_torch_args(options)])
        # The machine's peak: JAX's matmul on the CPU undivided, whatever --cpu_devices asks of the steps.
        peaks[framework], error = _worker(args, env if framework == "torch" else xla_env)
        log(f"{framework} {dtype} matmul peak: " + (f"{peaks[framework]['flops_per_s'] / 1e9:.1f} GFLOP/s"
                                                    if peaks[framework] else f"failed ({error})"))
    measured = [p["flops_per_s"] for p in peaks.values() if p]
    peak = max(measured) if measured else None
    accelerators = {p.get("device_kind") or p.get("device_name") for p in peaks.values()
                    if p and p.get("platform", p.get("device")) not in ("cpu", None)}
    machine["accelerator"] = ", ".join(sorted(accelerators)) or None
    rows = []
    with tempfile.TemporaryDirectory(prefix="mlmjax-bench-") as tmp:
        for method in options["methods"]:
            for mlm in options["mlm"]:
                case_dir = os.path.join(tmp, f"{options['size']}-{method}-{'mlm' if mlm else 'plain'}")
                os.makedirs(case_dir)
                request = {"method": method, "mlm": mlm, "size": options["size"], "repeats": options["repeats"],
                           "warmup": options["warmup"], "compute_dtype": options["compute_dtype"],
                           "configs": options["configs"], "prepare_only": "jax" not in options["frameworks"],
                           "remat": options.get("remat", False), "attention": options.get("attention", "auto"),
                           "mlm_branch": options.get("mlm_branch", False),
                           "cpu_devices": _cpu_devices(options, method),
                           "count_flops": count_flops,
                           "profile": options.get("profile") and os.path.abspath(options["profile"])}
                request_path = os.path.join(case_dir, REQUEST_JSON)
                with open(request_path, "w") as f:
                    json.dump(request, f)
                base = {"method": method, "mlm": mlm, "size": options["size"], "compute_dtype": options["compute_dtype"],
                        "repeats": options["repeats"], "warmup": options["warmup"], "remat": options.get("remat", False)}
                measured = _measure_case(case_dir, request, options,
                                         lambda framework: env if framework == "torch" else jax_envs[method], log)
                prepared, error = bench_report.pool_processes(measured["jax"])
                if ("jax" in options["frameworks"] and prepared and prepared.get("flops") is None
                        and count_flops):
                    # Timed on an accelerator (or cut off before counting): the model's FLOPs from the CPU.
                    counted, flops_error = _worker(_jax_worker_args("flops", request_path),
                                                   dict(xla_env, JAX_PLATFORMS="cpu"), options.get("timeout"))
                    prepared.update(counted or {"flops_error": flops_error})
                jax_row = None
                if "jax" in options["frameworks"]:
                    jax_row = bench_report.finish_row(prepared or {"framework": "jax", "error": error}, base, peak,
                                                      None)
                    rows.append(jax_row)
                    log(bench_report.progress(jax_row))
                for framework in [f for f in options["frameworks"] if f in bench_report.REFERENCES]:
                    result, ref_error = bench_report.pool_processes(measured[framework])
                    reference_row = bench_report.finish_row(result or {"framework": framework, "error": ref_error},
                                                            base, peak, jax_row or prepared or {})
                    rows.append(reference_row)
                    log(bench_report.progress(reference_row))
                    if jax_row:
                        bench_report.compare(jax_row, reference_row)
        sharded = []
        kinds = []
        if options.get("compile_only"):  # one device, the method's own batch, --compute_dtype
            kinds.append((1, options["compute_dtype"], None, xla_env))
        if options.get("sharded_memory"):  # fsdp over fake devices, bf16, one example per device
            kinds.append((options.get("sharded_devices", 8), "bfloat16", 1, sharded_env))
        for devices, dtype, per_device_batch, kind_env in kinds:
            for method in options["methods"]:
                for mlm in options["mlm"]:
                    case_dir = os.path.join(tmp, f"abstract{devices}-{method}-{'mlm' if mlm else 'plain'}")
                    os.makedirs(case_dir)
                    request = {"method": method, "mlm": mlm, "compute_dtype": dtype,
                               "per_device_batch": per_device_batch, "configs": options["configs"],
                               "case_dir": case_dir, "remat": options.get("remat", False),
                               "count_flops": count_flops}
                    request_path = os.path.join(case_dir, REQUEST_JSON)
                    with open(request_path, "w") as f:
                        json.dump(request, f)
                    result, error = _worker(_jax_worker_args("sharded", request_path), kind_env)
                    entry = result or {"method": method, "mlm": mlm, "devices": devices, "compute_dtype": dtype,
                                       "error": error}
                    sharded.append(entry)
                    log(f"compiled on {devices} device(s) {method} mlm={mlm}: " + (
                        f"{bench_report.fmt(entry['peak_bytes_per_device'], '.2f', 2**30)} GiB per device"
                        if result else error))
    machine["load_average_end"] = list(os.getloadavg())
    return {"machine": machine, "matmul_peak": {"jax": peaks.get("jax"), "torch": peaks.get("torch"),
                                                "flops_per_s": peak},
            "rows": rows, "mlm": bench_report.mlm_rows(rows), "sharded_memory": sharded}


# ---------------------------------------------------------------------------------------------------
# The command


def _worker_main(kind: str, request_path: str | None, case_dir: str | None, out: str, peak_repeats: int = 10,
                 compute_dtype: str = "float32") -> None:
    """The subprocess side: one measurement, written as JSON to ``out``."""
    if not os.environ.get("MLMJAX_BENCH_NO_CACHE"):
        runtime.enable_compilation_cache()
    request = {"peak_repeats": peak_repeats}
    if request_path:
        with open(request_path) as f:
            request = json.load(f)
    if kind == "peak":
        row = bench_cases.jax_matmul_peak(repeats=request.get("peak_repeats", 10), dtype=compute_dtype)
    elif kind == "jax":
        row = bench_cases.run_jax_case(request, case_dir, partial=out + PARTIAL_SUFFIX)
    elif kind == "flops":
        row = bench_cases.count_flops(request)
    elif kind == "sharded":
        row = bench_cases.sharded_memory(request)
    else:
        raise ValueError(f"unknown worker {kind!r}")
    with open(out, "w") as f:
        json.dump(row, f)


def _split(value: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in allowed]
    if unknown or not items:
        runtime.fail(f"--{flag}={value}: choose from {','.join(allowed)}")
    return items


def define_flags() -> None:
    """The command's flags; defined only when it runs, so importing this module defines none."""
    from absl import flags

    flags.DEFINE_string("methods", ",".join(config_lib.METHODS), "comma-separated methods")
    flags.DEFINE_string("mlm", "on,off", "MLM on, off or both (on,off)")
    flags.DEFINE_enum("size", "tiny", SIZES, "tiny: the embedded model; sd15: SD 1.5 shapes, random weights")
    flags.DEFINE_integer("repeats", 5, "timed steps per configuration (the median is reported)")
    flags.DEFINE_integer("warmup", 2, "untimed steps first (at least 1: the first call)")
    flags.DEFINE_integer("processes", 1, "fresh processes per configuration and framework, taken in turns; a "
                         "row pools their timed steps and shows the spread of their medians (a tiny step's speed "
                         "can differ by a third between processes)")
    flags.DEFINE_string("framework", "jax,torch", "comma-separated: jax, torch (the PyTorch reference), "
                        "diffusers_flax (diffusers' Flax models, in --diffusers_flax_python), or none (only "
                        "--sharded_memory or --compile_only)")
    flags.DEFINE_string("diffusers_flax_python", os.environ.get("MLMJAX_DIFFUSERS_FLAX_PYTHON"),
                        "the interpreter of the diffusers-Flax reference: an environment with diffusers 0.39 and "
                        "transformers 4.x, which launch/diffusers_flax_env.sh makes (default: "
                        "$MLMJAX_DIFFUSERS_FLAX_PYTHON, else this interpreter)")
    flags.DEFINE_enum("compute_dtype", "float32", ("float32", "bfloat16"), "compute dtype of both frameworks")
    flags.DEFINE_bool("sharded_memory", False, "also compile the SD 1.5 step on 8 fake devices (fsdp=8, bf16, "
                      "batch 1 per device) for each method and MLM setting, and report its memory per device")
    flags.DEFINE_bool("compile_only", False, "SD 1.5 shapes: compile each step on one device from abstract "
                      "arrays (no weights, no steps) and report XLA's memory and FLOPs: for a machine without the "
                      "memory to run it")
    flags.DEFINE_bool("count_flops", True, "count each JAX step's model FLOPs (XLA's cost analysis of the step "
                      "lowered again, twice more with MLM: 35 s of tiny DreamBooth + MLM's row on a 2-core CPU, 30 s "
                      "of SD 1.5 TI + MLM's --compile_only); --nocount_flops leaves FLOPs and FLOP/s out")
    flags.DEFINE_integer("peak_repeats", 10, "timed matmuls of the peak measurement (the median is the peak)")
    flags.DEFINE_bool("remat", False, "JAX: config.remat (recompute UNet blocks in the backward pass)")
    flags.DEFINE_bool("mlm_branch", False, "with MLM on, also time the MLM branch alone (its loss and gradient, "
                      "compiled on its own) in JAX and diffusers-Flax: is it hidden beside the rest of the step?")
    flags.DEFINE_enum("attention", "auto", attention.IMPLEMENTATIONS, "JAX: the attention the step is compiled "
                      "with; auto: cuDNN's fused kernel for half-precision attention on a GPU, else chunked above "
                      "2^18 scores (mlmjax.models.attention)")
    flags.DEFINE_enum("torch_device", "auto", ("auto", "cpu", "cuda"), "PyTorch's device; auto: a CUDA GPU where "
                      "torch sees one, else the CPU")
    flags.DEFINE_string("profile", None, "JAX: also run 3 steps under the profiler after the timed ones and "
                        "report where their time goes (mlmjax.profiling); the traces go to this folder")
    flags.DEFINE_string("cpu_devices", "0", "JAX: split the CPU into this many devices (config.mesh.cpu_devices) "
                        "and run each JAX step, mlmjax's and diffusers-Flax's, data-parallel over them (the batch "
                        "split by rows where they divide); PyTorch keeps its threads; 0: one device. Per method: "
                        "2,dreambooth=1 (DreamBooth's two-row batch gains nothing from a split)")
    flags.DEFINE_integer("sharded_devices", 8, "host devices (= fsdp size) of --sharded_memory")
    flags.DEFINE_float("timeout", None, "seconds each configuration's JAX or PyTorch subprocess may run; a JAX "
                       "step cut off keeps what it had measured (compiled, then timed, then its FLOPs counted)")
    flags.DEFINE_string("json", None, "write the rows (and the machine) to this JSON file")
    flags.DEFINE_bool("markdown", False, "print README-ready tables")
    flags.DEFINE_bool("compilation_cache", False, "use the persistent compilation cache (compile s then measures a "
                      "cache load); off: compile times are cold")
    flags.DEFINE_integer("torch_threads", 0, "PyTorch intra-op threads; 0: its default (one per core). On a busy "
                         "machine 1 avoids a 10-50x slowdown from threads waiting on each other")
    flags.DEFINE_string("configs", config_lib.CONFIGS_DIR, "the folder of method configs (the repository's configs/)")
    # Internal: what the subprocesses run.
    flags.DEFINE_enum("worker", None, ("peak", "jax", "flops", "sharded"), "internal: run one measurement")
    flags.DEFINE_string("request", None, "internal")
    flags.DEFINE_string("case", None, "internal")
    flags.DEFINE_string("out", None, "internal")


def main(argv: list[str]) -> None:
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if f.worker:
        _worker_main(f.worker, f.request, f.case, f.out, f.peak_repeats, f.compute_dtype)
        return
    runtime.quiet_library_logs()
    frameworks = [] if f.framework == "none" else _split(f.framework, bench_report.FRAMEWORKS, "framework")
    if f.compile_only:
        if f.size != "sd15":
            runtime.fail("--compile_only compiles SD 1.5 shapes: add --size=sd15")
        frameworks = []
    if not frameworks and not (f.sharded_memory or f.compile_only):
        runtime.fail("--framework=none measures nothing without --sharded_memory or --compile_only")
    if f.timeout is not None and f.timeout <= 0:
        runtime.fail(f"--timeout={f.timeout:g}: give a positive number of seconds")
    if "diffusers_flax" in frameworks and f.diffusers_flax_python and not os.access(f.diffusers_flax_python, os.X_OK):
        runtime.fail(f"--diffusers_flax_python={f.diffusers_flax_python}: not an executable; make the environment "
                     "with launch/diffusers_flax_env.sh and give its bin/python")
    if f.repeats < 1 or f.warmup < 1 or f.processes < 1:
        runtime.fail(f"--repeats={f.repeats}, --warmup={f.warmup} and --processes={f.processes} must be at least 1")
    options = {"methods": _split(f.methods, config_lib.METHODS, "methods"),
               "mlm": [m == "on" for m in _split(f.mlm, ("on", "off"), "mlm")],
               "size": f.size, "repeats": f.repeats, "warmup": f.warmup, "frameworks": frameworks,
               "compute_dtype": f.compute_dtype, "configs": f.configs, "sharded_memory": f.sharded_memory,
               "sharded_devices": f.sharded_devices,
               "compilation_cache": f.compilation_cache,
               "torch_threads": f.torch_threads, "compile_only": f.compile_only, "remat": f.remat,
               "peak_repeats": f.peak_repeats, "attention": f.attention, "torch_device": f.torch_device,
               "timeout": f.timeout, "profile": f.profile, "diffusers_flax_python": f.diffusers_flax_python,
               "mlm_branch": f.mlm_branch, "processes": f.processes, "count_flops": f.count_flops,
               "log": lambda message: print(message, file=sys.stderr, flush=True)}
    if not os.path.isdir(f.configs):
        runtime.fail(f"--configs={f.configs}: not a folder; point it at the repository's configs/")
    try:  # before anything runs: the JAX subprocesses get their devices through XLA_FLAGS
        options["cpu_devices"] = _parse_cpu_devices(f.cpu_devices)
        _jax_environments(dict(os.environ), options)
    except ValueError as e:
        runtime.fail(str(e))
    missing = _missing_packages(frameworks)
    if missing:
        runtime.fail(f"{sys.executable} cannot import {', '.join(missing)}, which the benchmark's subprocesses "
                     "need: pip install -e '.[bench]' (on a machine without a package index, install their wheels)")
    result = run(options)
    if f.json:
        with open(f.json, "w") as out:
            json.dump(result, out, indent=1)
    if f.markdown or not f.json:
        print(bench_report.markdown(result))
    failed = [r for r in result["rows"] + result["sharded_memory"] if r.get("error")]
    if failed:
        runtime.fail(f"{len(failed)} configuration(s) failed; see the rows")


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main, flags_parser=runtime.parse_flags)
