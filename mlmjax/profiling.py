"""Where a compiled step's time goes: a profiler trace of a few calls, summed by kind of operation and
by the model that issued it.

    summary = profiling.profile_calls(lambda: step(state, batch, rng), compiled.as_text(), "/tmp/prof", steps=3)

XLA names every operation it runs (``fusion.12``, ``convolution.3``, a cuDNN custom call) in the trace
(``hlo_op``) and in the compiled module's text, where each instruction also carries the JAX name stack
it came from (``jit(train_step)/transpose(jvp(UNet2DConditionModel))/down_blocks_0/...``). Joining the
two gives each traced operation a kind (matmul, convolution, cuDNN attention, reduction, elementwise,
data movement, collective: what the fusion computes, looked up inside it) and a scope (the Flax model,
forward or backward pass; outside the models, the function that issued it, from the module's
source locations: ``mlm._chunked_statistics``, ``train_step.diffusion_draws``, ``optimizer.adamw``;
inside a loop's body, what XLA made without a source takes the loop's scope; "unattributed" for what
it made without one elsewhere, such as layout copies). Inside a model the layer
narrows the scope to the two innermost Flax modules (``UNet2DConditionModel transformer_blocks/attn1
backward``: the attention between its projections), summed over every block that has one. Loops
and conditionals are containers: their bodies' operations are counted, not the loop itself. On a GPU
the device's kernels are counted, each for its duration; on a CPU each operation is charged from its
start to the next operation's start (XLA's CPU runtime hands convolutions and large products to a
thread pool, and their events end at the hand-off), so the charges add up to the steps' wall time but
for the Python between them.
The profile itself stays in ``folder`` (an ``.xplane.pb``) for TensorBoard's profile plugin or XProf.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import itertools
import os
import re
import time
from typing import Any, Callable

# In the order they claim a fusion that does several: its most expensive kind of work names it.
CATEGORIES = ("attention (cuDNN)", "convolution", "matmul", "collective", "reduction", "elementwise",
              "data movement")
UNATTRIBUTED = "unattributed"  # an operation XLA made without a source (copies, rewrites)
_CONTAINERS = frozenset({"while", "conditional", "call", "async-start", "async-done"})
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_DATA_MOVEMENT = frozenset({"copy", "transpose", "slice", "dynamic-slice", "dynamic-update-slice", "concatenate",
                            "pad", "gather", "scatter", "bitcast", "broadcast", "reshape", "copy-start",
                            "copy-done", "reverse", "iota", "select", "convert"})
_BOOKKEEPING = frozenset({"parameter", "constant", "get-tuple-element", "tuple"})
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \(")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$")
_CALLED = re.compile(r"\b(?:calls|to_apply|body|condition|branch_computations)=\{?%([\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_OP_NAME = re.compile(r'op_name="([^"]+)"')
_FRAME = re.compile(r"stack_frame_id=(\d+)")
_TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")
# A traced operation: (name, start ms, duration ms, run id or None).
_Event = tuple[str, float, float, Any]
_MODEL = re.compile(r"^(transpose\()?jvp\(([A-Z]\w*)")
# A Flax module's name on the name stack, not a transform's or a loop's (jit(...), while, body, ...).
_MODULE_NAME = re.compile(r"^(?!(?:while|body|cond|closed_call|checkpoint|remat|branch)$)[A-Za-z_]\w*$")


@dataclasses.dataclass(frozen=True)
class HloOp:
    """One instruction of a compiled module: its opcode, the kind of work it does, its scope and, inside
    a model, the layer that issued it (``UNet2DConditionModel transformer_blocks/attn1 backward``)."""
    opcode: str
    category: str
    scope: str
    layer: str


@dataclasses.dataclass
class _Instruction:
    opcode: str
    called: list[str]
    target: str
    op_name: str
    frame: int | None


def _opcode(rest: str) -> str:
    """The opcode of an instruction's right-hand side, after its (possibly tuple) shape."""
    if rest.startswith("("):
        depth = 0
        for i, char in enumerate(rest):
            depth += (char == "(") - (char == ")")
            if depth == 0:
                rest = rest[i + 1:]
                break
    else:
        rest = rest.split(" ", 1)[1] if " " in rest else ""
    return rest.strip().split("(", 1)[0]


def _sources(tables: dict[str, dict[int, str]]) -> dict[int, str]:
    """Stack frame id -> ``file.function`` of its innermost location (``mlm._chunked_statistics``), from
    the module text's FileNames, FunctionNames, FileLocations and StackFrames tables."""
    files, functions = tables.get("FileNames", {}), tables.get("FunctionNames", {})
    locations = {}
    for key, value in tables.get("FileLocations", {}).items():
        match = re.match(r"\{file_name_id=(\d+) function_name_id=(\d+)", value)
        if match:
            file = os.path.basename(files.get(int(match.group(1)), "").strip('"')).removesuffix(".py")
            function = functions.get(int(match.group(2)), "").strip('"').split(".<locals>")[0]
            locations[key] = f"{file}.{function}"
    frames = {}
    for key, value in tables.get("StackFrames", {}).items():
        match = re.match(r"\{file_location_id=(\d+)", value)
        if match and int(match.group(1)) in locations:
            frames[key] = locations[int(match.group(1))]
    return frames


def _parse(hlo_text: str) -> tuple[dict[str, dict[str, _Instruction]], set[str], dict[int, str]]:
    """Computations (name -> instructions), the names of those that run as a fusion's body, and the
    source (``file.function``) of each stack frame id."""
    computations: dict[str, dict[str, _Instruction]] = {}
    fused: set[str] = set()
    tables: dict[str, dict[int, str]] = {}
    current = table = None
    for line in hlo_text.splitlines():
        if line in _TABLES:
            table = tables.setdefault(line, {})
            continue
        if table is not None:
            key, _, value = line.partition(" ")
            if key.isdigit():
                table[int(key)] = value
                continue
            table = None
        opened = _COMPUTATION.match(line)
        if opened:
            current = computations.setdefault(opened.group(1), {})
            continue
        if line.startswith("}"):
            current = None
            continue
        match = _INSTRUCTION.match(line) if current is not None else None
        if not match:
            continue
        rest = match.group(2)
        opcode = _opcode(rest)
        target, op_name, frame = _TARGET.search(rest), _OP_NAME.search(rest), _FRAME.search(rest)
        called = _CALLED.findall(rest)
        if opcode == "fusion":
            fused.update(called)
        current[match.group(1)] = _Instruction(opcode, called, target.group(1) if target else "",
                                               op_name.group(1) if op_name else "",
                                               int(frame.group(1)) if frame else None)
    return computations, fused, _sources(tables)


def _kinds(instruction: _Instruction, computations: dict[str, dict[str, _Instruction]],
           seen: set[str] | None = None) -> set[str]:
    """The kinds of work an instruction does, looking inside the computations it calls."""
    seen = set() if seen is None else seen
    opcode, target = instruction.opcode, instruction.target.lower()
    if opcode == "custom-call":
        if "fmha" in target:
            return {"attention (cuDNN)"}
        if "conv" in target:
            return {"convolution"}
        if "gemm" in target or "matmul" in target:
            return {"matmul"}
    if opcode == "convolution":
        return {"convolution"}
    if opcode == "dot":
        return {"matmul"}
    if opcode.removesuffix("-start").removesuffix("-done") in _COLLECTIVES:
        return {"collective"}
    if opcode in ("reduce", "reduce-window"):
        return {"reduction"}
    if opcode in _DATA_MOVEMENT:
        return {"data movement"}
    if opcode in _BOOKKEEPING:
        return set()
    kinds: set[str] = set()
    for name in instruction.called:
        if name in seen or name not in computations:
            continue
        seen.add(name)
        for inner in computations[name].values():
            kinds |= _kinds(inner, computations, seen)
    return kinds or {"elementwise"}


def _category(kinds: set[str]) -> str:
    """The kind that dominates an operation's time: the first of ``CATEGORIES`` it does, data movement
    only when it does nothing else (a fusion that broadcasts and multiplies is elementwise)."""
    for category in CATEGORIES:
        if category in kinds and category != "data movement":
            return category
    return "data movement" if kinds else "elementwise"


def _scope(instruction: _Instruction, sources: dict[int, str]) -> str:
    """``UNet2DConditionModel forward``, ``CLIPTextModel backward``, ... from the JAX name stack; outside
    the models, the function that issued it (``mlm._chunked_statistics``, ``optimizer.adamw``)."""
    for segment in instruction.op_name.split("/"):
        match = _MODEL.match(segment)
        if match:
            return f"{match.group(2)} {'backward' if match.group(1) else 'forward'}"
    return sources.get(instruction.frame, UNATTRIBUTED)


def _layer(instruction: _Instruction, scope: str) -> str:
    """The scope narrowed to the two innermost Flax modules on the name stack, their indices dropped
    (``attn1/to_q``, ``transformer_blocks/attn1`` for the attention between its projections), so that
    every block's copy of a layer adds up; outside the models, the scope itself."""
    segments = instruction.op_name.split("/")
    start = next((i for i, segment in enumerate(segments) if _MODEL.match(segment)), None)
    if start is None:
        return scope
    model, direction = scope.rsplit(" ", 1)
    modules = [re.sub(r"_\d+$", "", s) for s in segments[start + 1:-1] if _MODULE_NAME.match(s)]
    return f"{model} {'/'.join(modules[-2:]) or '(top)'} {direction}"


def _callers(computations: dict[str, dict[str, _Instruction]],
             fused: set[str]) -> dict[str, tuple[_Instruction, str]]:
    """Each computation a loop, call or conditional runs: that instruction and the computation it is in
    (fusion bodies are not run on their own)."""
    callers = {}
    for computation, instructions in computations.items():
        if computation not in fused:
            for instruction in instructions.values():
                if instruction.opcode in _CONTAINERS:
                    callers.update((called, (instruction, computation)) for called in instruction.called)
    return callers


def hlo_ops(hlo_text: str) -> dict[str, HloOp]:
    """Every instruction that runs on its own (not inside a fusion) of a compiled module's text
    (``jax.stages.Compiled.as_text()``), by name.

    An instruction XLA made without a source inside a loop's body (SD 1.5's attention loops lose their
    products' sources) takes the scope and layer of the innermost loop around it that has one; only what
    has none up its chain of loops stays unattributed."""
    computations, fused, sources = _parse(hlo_text)
    callers = _callers(computations, fused)

    def scope_and_layer(instruction: _Instruction, computation: str) -> tuple[str, str]:
        scope, seen = _scope(instruction, sources), {computation}
        while scope == UNATTRIBUTED and computation in callers:
            instruction, computation = callers[computation]
            if computation in seen:  # a malformed module's cycle
                break
            seen.add(computation)
            scope = _scope(instruction, sources)
        return scope, _layer(instruction, scope)

    ops = {}
    for computation, instructions in computations.items():
        if computation in fused:
            continue
        for name, instruction in instructions.items():
            if instruction.opcode in _BOOKKEEPING:
                continue
            category = "container" if instruction.opcode in _CONTAINERS else _category(
                _kinds(instruction, computations))
            scope, layer = scope_and_layer(instruction, computation)
            ops[name] = HloOp(instruction.opcode, category, scope, layer)
    return ops


def module_name(hlo_text: str) -> str:
    """The ``HloModule`` name on a compiled module's first line (what the trace's ``hlo_module`` says)."""
    match = re.match(r"HloModule ([\w.\-]+)", hlo_text)
    return match.group(1) if match else ""


def _op_events(trace_path: str, ops: dict[str, HloOp],
               module: str) -> tuple[str, list[_Event], float]:
    """``(where, [(operation, start ms, duration ms, run), ...], unmatched ms)``: ``module``'s operations
    in an ``.xplane.pb``, and on a device the kernel time matched to none of them. ``run`` is the event's
    ``run_id`` statistic, which XLA's CPU runtime gives every operation of one execution (None where the
    trace has none).

    An event is one of ``ops`` by its ``hlo_op`` statistic, else by its name (a GPU kernel is named after
    its fusion with "_" for "."), and belongs to ``module`` by its ``hlo_module`` statistic where it has
    one. Where a device plane (``/device:...``) has any, only its kernel lines count (``Stream ...``, or
    every line where none is so named): the host's launch events, and any timeline derived from the
    kernels, would count an operation twice. The profile is read with ``jax.profiler.ProfileData``: a
    Perfetto or Chrome trace of it stops at a million events, which an SD 1.5 step on a CPU exceeds.
    """
    from jax.profiler import ProfileData

    kernel_names = {name.replace(".", "_"): name for name in ops}
    found: dict[bool, list[_Event]] = {True: [], False: []}
    unmatched_ms = 0.0
    for plane in ProfileData.from_file(trace_path).planes:
        on_device = plane.name.startswith("/device:")
        lines = list(plane.lines)
        if on_device and any(line.name.startswith("Stream") for line in lines):
            lines = [line for line in lines if line.name.startswith("Stream")]
        for line in lines:
            for event in line.events:
                stats = dict(event.stats)
                name = stats.get("hlo_op") or event.name
                name = name if name in ops else kernel_names.get(name)
                if name is not None and not (module and stats.get("hlo_module", module) != module):
                    found[on_device].append((name, event.start_ns / 1e6, event.duration_ns / 1e6,
                                             stats.get("run_id")))
                elif on_device:
                    unmatched_ms += event.duration_ns / 1e6
    return ("device", found[True], unmatched_ms) if found[True] else ("host", found[False], 0.0)


def _charges(where: str, events: list[_Event], ops: dict[str, HloOp]) -> list[tuple[str, float]]:
    """What each event costs: a kernel its duration; on the host, the time from its start to the next
    operation's start, because XLA's CPU runtime hands convolutions and large products to its thread pool
    and the event ends at that hand-off (an SD 1.5 convolution's event lasts 1-5 ms of its ~850). A
    call's last operation is charged its own duration, not the Python between two calls (:func:`_calls`).
    The runtime also runs independent operations side by side, which this cannot split: a small
    operation started while a convolution runs in the pool is charged until the next start (DreamBooth's
    SD 1.5 gradient-norm sums, a few numbers each, were charged 5.3 s a step), so read host profiles by
    model and pass rather than by single operation."""
    if where == "device":
        return [(name, ms) for name, _, ms, _ in events if ops[name].category != "container"]
    events = sorted(events, key=lambda event: event[1])
    calls = _calls(events)
    charges = []
    for index, (name, start, duration, _) in enumerate(events):
        same_call = index + 1 < len(events) and calls[index + 1] == calls[index]
        end = events[index + 1][1] if same_call else start + duration
        # Loops and conditionals only order their bodies here; the bodies' operations are charged.
        if ops[name].category != "container":
            charges.append((name, end - start))
    return charges


def _calls(events: list[_Event]) -> list[Any]:
    """Which call each of the time-ordered ``events`` belongs to: its run id, else (a trace without them)
    how many times the first operation traced has started again. The run id is the exact boundary: the
    two runtime threads start a step with either of two operations, so that in tiny DreamBooth's
    profile 3 of 10 calls began with another operation than the first, and the heuristic alone charged
    the Python between two calls (~1 ms) to the previous call's last operation."""
    if all(run is not None for *_, run in events):
        return [run for *_, run in events]
    first = events[0][0] if events else None
    restarts = itertools.accumulate(int(index > 0 and name == first) for index, (name, *_) in enumerate(events))
    return list(restarts)


def summarize(trace_path: str, ops: dict[str, HloOp], module: str, steps: int, top: int = 15) -> dict[str, Any]:
    """Per-step operation time of ``module`` in a profile (``.xplane.pb``): by category, by scope, the
    ``top`` layers and the ``top`` operations (with their events per step: on a device, its kernels)."""
    where, events, unmatched_ms = _op_events(trace_path, ops, module)
    per_op_ms: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, int] = collections.Counter()
    for name, ms in _charges(where, events, ops):
        per_op_ms[name] += ms / steps
        calls[name] += 1
    totals: dict[str, dict[str, float]] = {key: collections.defaultdict(float)
                                           for key in ("category", "scope", "layer")}
    for name, ms in per_op_ms.items():
        for key, total in totals.items():
            total[getattr(ops[name], key)] += ms

    def ranked(values: dict[str, float], count: int | None = None) -> dict[str, float]:
        return dict(sorted(values.items(), key=lambda kv: -kv[1])[:count])

    return {
        "steps": steps, "where": where, "op_ms_per_step": sum(per_op_ms.values()),
        "unmatched_device_ms_per_step": unmatched_ms / steps,  # kernels of no operation of the module
        "by_category": ranked(totals["category"]), "by_scope": ranked(totals["scope"]),
        "by_layer": ranked(totals["layer"], top),
        "top_ops": [{"name": name, "opcode": ops[name].opcode, "category": ops[name].category,
                     "scope": ops[name].scope, "layer": ops[name].layer, "ms_per_step": ms,
                     "calls_per_step": calls[name] / steps} for name, ms in ranked(per_op_ms, top).items()],
    }


def trace_calls(call: Callable[[], Any], folder: str, steps: int) -> tuple[str, float]:
    """Runs ``call`` (which must wait for its results) ``steps`` times under the profiler; returns the
    profile written under ``folder`` (an ``.xplane.pb``, what TensorBoard's profile plugin and XProf
    read) and the mean wall time of one call in milliseconds (the charges are means too)."""
    import jax

    os.makedirs(folder, exist_ok=True)
    pattern = os.path.join(folder, "**", "*.xplane.pb")
    before = set(glob.glob(pattern, recursive=True))
    times = []
    with jax.profiler.trace(folder):
        for _ in range(steps):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    written = set(glob.glob(pattern, recursive=True)) - before
    if not written:
        raise RuntimeError(f"the profiler wrote no .xplane.pb under {folder}")
    return max(written, key=os.path.getmtime), 1000 * sum(times) / len(times)


def profile_calls(call: Callable[[], Any], hlo_text: str, folder: str, steps: int = 3) -> dict[str, Any]:
    """``trace_calls`` then ``summarize`` against the compiled module's text; the summary also holds the
    traced calls' mean wall time and the trace's path."""
    trace_path, wall_ms = trace_calls(call, folder, steps)
    summary = summarize(trace_path, hlo_ops(hlo_text), module_name(hlo_text), steps)
    return {**summary, "wall_ms_per_step": wall_ms, "trace": trace_path}
