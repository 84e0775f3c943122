"""Ahead-of-time compilation of a jitted step, with what XLA says it costs.

``compile_step(jax.jit(f), *args)`` lowers and compiles ``f`` for the shapes, dtypes and shardings of
``args`` (arrays, or ``jax.ShapeDtypeStruct``s with a ``sharding``, so a Stable-Diffusion-sized step
can be sized without allocating its weights) and returns the executable with its compile time, its
FLOPs and its per-device memory: numbers a run logs once at start-up and a benchmark reports.

On a CPU it also picks which kernels run a step (:func:`cpu_compiler_options`), and has a small
step's temporaries reused from the heap (:func:`mlmjax.runtime.reuse_host_memory`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import time
from typing import Any, Callable

import jax

from mlmjax import runtime

# CompiledMemoryStats fields, per device, under the names Compiled.memory uses.
_MEMORY_FIELDS = {"argument": "argument_size_in_bytes", "output": "output_size_in_bytes",
                  "temp": "temp_size_in_bytes", "alias": "alias_size_in_bytes",
                  "generated_code": "generated_code_size_in_bytes"}

# jaxlib 0.10's CPU compiler hands convolutions, products and reductions to YNNPACK. That pays on some
# small operations, whose cost is mostly the call, and loses on large ones: the SD 1.5 TI step (batch 4,
# 512 px) ran in 24.1 s with XLA's own kernels against 28.4 s with YNNPACK's (2-core AMD EPYC; 3 steps
# each, compiled side by side; on a 2-core Xeon its UNet forward took 6.3 against 8.1 s) and kept less
# in temporaries. The choice follows the step's size (the tiny steps count 1-5 GFLOP, SD 1.5's
# thousands) and, below it, what its convolutions compute. The tiny UNet's 3x3 convolutions alone
# (batch 4, 4x4 to 16x16, 32-128 features) ran at 84-104 GFLOP/s on XLA's kernels against 28-69 on
# YNNPACK's, and the tiny steps whose convolution kernels are frozen ran faster on XLA's (one process,
# the variants compiled side by side and run in turns, 48 steps each; one CPU device): TI 47.8 -> 36.0
# ms, TI + MLM 122.8 -> 116.4, Custom Diffusion 112.9 -> 66.5 (two devices: TI 33.4 -> 31.4, Custom
# Diffusion 54.5 -> 54.5). A kernel's gradient is itself a convolution, of the input with the incoming
# gradient, and there YNNPACK's won: the tiny DreamBooth step took 57.2 ms on YNNPACK's against 62.2.
_YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"
_XLA_KERNELS_ABOVE_FLOPS = 1e11
# The input's dimension labels of a convolution in StableHLO's text, "dim_numbers = [b, 0, 1, f]x...": a
# kernel's gradient convolves the input with the batch as its features, so its labels do not start with b.
_CONVOLUTION_INPUT_LABELS = re.compile(r"stablehlo\.convolution[^\n]*?dim_numbers = \[(\w+)")


@dataclasses.dataclass(frozen=True)
class Compiled:
    """A compiled step and its costs.

    Attributes:
      executable: call it like the jitted function (same argument shapes and shardings): a
        ``jax.stages.Compiled``, or for a :func:`mlmjax.sharding.jit_step` step one that passes the
        frozen weights apart and XLA's analyses through.
      compile_seconds: wall time of lowering plus compiling (a persistent-cache hit is fast).
      flops: XLA's count for one call on one device (a sharded step's count is each device's share;
        a lowered, unpartitioned step's count is the whole step's); None where the backend gives
        none. It counts each loop's body once: a step that loops over attention or vocabulary chunks does more
        (``mlmjax.bench_cases.model_flops`` counts the model's FLOPs without the loops).
      compiler_options: the XLA options it was compiled with (:func:`cpu_compiler_options`).
      lowered_flops: XLA's count for the step as lowered, before it is partitioned and optimised: the
        whole step's, over all its devices, so ``flops / lowered_flops`` is about the share each device
        computes (1 for a step that splits nothing); None where the backend gives none.
      memory: bytes per device: ``argument``, ``output``, ``temp`` (XLA's temporaries: the
        activations kept for the backward pass live here), ``alias`` (outputs written into donated
        inputs), ``generated_code``, and ``peak_bytes`` = argument + output + temp - alias, an upper
        estimate of what one device holds while the step runs. None where the backend gives none.
    """
    executable: Any
    compile_seconds: float
    flops: float | None
    memory: dict[str, int] | None
    compiler_options: dict[str, str] = dataclasses.field(default_factory=dict)
    lowered_flops: float | None = None

    def __call__(self, *args, **kwargs):
        return self.executable(*args, **kwargs)

    def describe(self) -> str:
        """One line, e.g. ``compiled in 41.2 s; 1.23 GFLOP/step; peak 0.45 GB per device (args 0.2, temp 0.2)``."""
        parts = [f"compiled in {self.compile_seconds:.1f} s"]
        if self.compiler_options.get(_YNN_OPTION) == "":
            parts[0] += " (XLA's own CPU kernels, no YNNPACK)"
        if self.flops is not None:
            parts.append(f"{self.flops / 1e9:.3g} GFLOP/step")
        if self.memory is not None:
            gb = {name: value / 1e9 for name, value in self.memory.items()}
            parts.append(f"peak {gb['peak_bytes']:.3g} GB per device "
                         f"(args {gb['argument']:.3g}, temp {gb['temp']:.3g})")
        return "; ".join(parts)


def flops(stage: jax.stages.Lowered | jax.stages.Compiled) -> float | None:
    """XLA's FLOP count of one call of a lowered or compiled function (a lowered one costs no compile);
    None where the backend gives none."""
    try:
        cost = stage.cost_analysis()
    except Exception:  # noqa: BLE001 - backends without a cost model raise various errors
        return None
    if isinstance(cost, (list, tuple)):  # older jax: one dict per partition
        cost = cost[0] if cost else None
    count = (cost or {}).get("flops")
    return None if count is None or count < 0 else float(count)


def _memory(executable: Any) -> dict[str, int] | None:
    try:
        stats = executable.memory_analysis()
    except Exception:  # noqa: BLE001
        return None
    if stats is None:
        return None
    memory = {name: int(getattr(stats, field, 0) or 0) for name, field in _MEMORY_FIELDS.items()}
    memory["peak_bytes"] = memory["argument"] + memory["output"] + memory["temp"] - memory["alias"]
    return memory


def cpu_compiler_options(lower: Callable[[], jax.stages.Lowered]) -> dict[str, str]:
    """XLA options for compiling what ``lower()`` lowers: on a CPU, XLA's own kernels instead of YNNPACK's
    for a program of more than 1e11 FLOPs (XLA's count of the lowered program), or for one with
    convolutions none of which makes a kernel's gradient (a frozen UNet's step, a sampler); nothing
    otherwise, nor where ``XLA_FLAGS`` sets ``--xla_cpu_experimental_ynn_fusion_type`` itself (the user's
    choice stands). ``lower`` is called once, and only where there is a choice to make."""
    lowered = functools.cache(lower)
    return _options_for(lowered, lambda: flops(lowered()))


def _trains_no_convolution_kernel(lowered: jax.stages.Lowered) -> bool:
    """Whether the lowered program has convolutions and none of them makes a kernel's gradient."""
    labels = _CONVOLUTION_INPUT_LABELS.findall(lowered.as_text())
    return bool(labels) and all(label == "b" for label in labels)


def xla_kernel_options() -> dict[str, str]:
    """The XLA options for XLA's own CPU kernels instead of YNNPACK's, what the SD 1.5 steps get; none
    off a CPU or where ``XLA_FLAGS`` sets ``--xla_cpu_experimental_ynn_fusion_type`` itself."""
    if jax.default_backend() != "cpu" or _YNN_OPTION in os.environ.get("XLA_FLAGS", ""):
        return {}
    return {_YNN_OPTION: ""}


def _options_for(lowered: Callable[[], jax.stages.Lowered], count: Callable[[], float | None]) -> dict[str, str]:
    """:func:`cpu_compiler_options` from the lowered program and its FLOP count, asked for only where needed."""
    options = xla_kernel_options()
    if not options:
        return {}
    flop_count = count()
    large = flop_count is not None and flop_count > _XLA_KERNELS_ABOVE_FLOPS
    return options if large or _trains_no_convolution_kernel(lowered()) else {}


def compile_step(jitted: Any, *args, **kwargs) -> Compiled:
    """Lowers and compiles ``jitted`` (a ``jax.jit`` function) for ``args`` without running it, with
    :func:`cpu_compiler_options`. On a CPU, a step whose temporaries fit in
    :data:`mlmjax.runtime.HEAP_BUFFERS_UP_TO` bytes turns on :func:`mlmjax.runtime.reuse_host_memory`:
    XLA allocates them at every call, and unless the heap keeps them they are page-faulted in afresh.

    ``args`` may be arrays or ``jax.ShapeDtypeStruct``s (give them a ``sharding`` to compile for a
    mesh); donated arguments are not consumed.
    """
    start = time.perf_counter()
    lowered = jitted.lower(*args, **kwargs)
    lowered_flops = flops(lowered)
    options = _options_for(lambda: lowered, lambda: lowered_flops)
    executable = lowered.compile(options or None)
    seconds = time.perf_counter() - start
    memory = _memory(executable)
    if jax.default_backend() == "cpu" and memory is not None and memory["temp"] <= runtime.HEAP_BUFFERS_UP_TO:
        runtime.reuse_host_memory()
    return Compiled(executable=executable, compile_seconds=seconds, flops=flops(executable), memory=memory,
                    compiler_options=options, lowered_flops=lowered_flops)
