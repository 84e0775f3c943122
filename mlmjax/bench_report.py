"""Turns the benchmark's measured rows into its report: summary statistics, JAX/PyTorch ratios, MLM's
cost, and the README-ready Markdown tables of ``python -m mlmjax.bench``.

    python -m mlmjax.bench_report a.json b.json   # the tables of several --json files as one report
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

from mlmjax import bench_torch
from mlmjax import profiling

FRAMEWORKS = ("jax", "torch", "diffusers_flax")
# The frameworks JAX is compared with, as the tables name them.
REFERENCES = {"torch": "PyTorch", "diffusers_flax": "diffusers-Flax"}
ROW_FIELDS = ("method", "mlm", "size", "framework", "compute_dtype", "batch", "prior_batch", "mlm_batch",
              "examples_per_step", "median_ms", "min_ms", "max_ms", "q1_ms", "q3_ms", "examples_per_s",
              "flops", "achieved_flops_per_s", "peak_fraction", "peak_memory_bytes", "peak_rss_bytes")


# ---------------------------------------------------------------------------------------------------
# Rows


def _summary(times: list[float]) -> dict[str, float]:
    ms = sorted(1000 * t for t in times)
    q = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else [ms[0]] * 3
    return {"median_ms": statistics.median(ms), "min_ms": ms[0], "max_ms": ms[-1], "q1_ms": q[0], "q3_ms": q[2]}


def process_median_ms(row: dict | None, error: str | None) -> float | None:
    """The median step time of one process's ``(row, error)``; None where it failed or timed nothing."""
    if error or not (row or {}).get("times_s"):
        return None
    return 1000 * statistics.median(row["times_s"])


def pool_processes(measured: list[tuple[dict | None, str | None]]) -> tuple[dict | None, str | None]:
    """One configuration timed in several fresh processes (``bench --processes``), as one worker's
    ``(row, error)``: the first successful process's row (compile time, FLOPs, memory, first loss) with
    the timed steps of every successful process pooled (``times_s``, ``mlm_branch_times_s``), each one's
    median kept in ``process_medians_ms`` (a tiny step's speed can differ between processes, not only
    between steps) and the other processes' failures in ``process_errors``. Where none succeeded, the
    first process's ``(row, error)``."""
    succeeded = [row for row, error in measured if process_median_ms(row, error) is not None]
    if not succeeded:
        return measured[0]
    pooled = dict(succeeded[0])
    for key in ("times_s", "mlm_branch_times_s"):
        if all(row.get(key) for row in succeeded):
            pooled[key] = [t for row in succeeded for t in row[key]]
    pooled["process_medians_ms"] = [process_median_ms(row, None) for row in succeeded]
    failures = [error for _, error in measured if error]
    if failures:
        pooled["process_errors"] = failures
    return pooled, None


def finish_row(row: dict, base: dict, peak: float | None, jax_row: dict | None) -> dict:
    """A worker's row completed: the configuration ``base``, time statistics, examples/s, FLOP/s and the
    fraction of the matmul ``peak``, every ``ROW_FIELDS`` key; a reference's row (PyTorch, diffusers-Flax)
    takes ``jax_row``'s batch and FLOPs (the same step)."""
    row = {**base, **row}
    if row["framework"] in REFERENCES:
        for key in ("batch", "prior_batch", "mlm_batch"):
            row.setdefault(key, (jax_row or {}).get(key))
        row["flops"] = (jax_row or {}).get("flops")
        row["flops_source"] = "the JAX row's model FLOPs (the same step)"
    if "times_s" in row:
        row.update(_summary(row["times_s"]))
        if row.get("batch") is not None:
            row["examples_per_step"] = row["batch"] + row["prior_batch"]
            row["examples_per_s"] = row["examples_per_step"] / (row["median_ms"] / 1000)
    if row["framework"] == "torch":
        row["peak_memory_bytes"] = row.get("peak_rss_bytes")
        row["peak_memory_source"] = "peak RSS of the subprocess"
    else:
        row["peak_memory_source"] = "compiled memory analysis (argument + output + temp - alias)"
    if row["framework"] == "jax" and row.get("flops") is not None:
        row["flops_source"] = ("XLA cost analysis of the step lowered with whole attention and the plain "
                               f"vocabulary projection, on {row.get('flops_counted_on') or 'the device'}")
    if row.get("device_peak_bytes"):  # an accelerator: what its allocator held at most, in both frameworks
        row["peak_memory_bytes"] = row["device_peak_bytes"]
        row["peak_memory_source"] = "the device allocator's peak"
    if row.get("flops") and row.get("median_ms"):
        row["achieved_flops_per_s"] = row["flops"] / (row["median_ms"] / 1000)
        row["peak_fraction"] = row["achieved_flops_per_s"] / peak if peak else None
    for key in ROW_FIELDS:
        row.setdefault(key, None)
    return row


def compare(jax_row: dict, reference_row: dict) -> None:
    """JAX's time and memory over a reference's (``time_ratio_jax_over_torch``, ``..._diffusers_flax``),
    written into the JAX row; and at the tiny size, where both share the weights and draws, the first
    losses' agreement (``loss_rel_error`` of the reference's row; the JAX row's is PyTorch's)."""
    name = reference_row["framework"]
    for field, ratio in (("median_ms", "time_ratio_jax_over"), ("peak_memory_bytes", "memory_ratio_jax_over"),
                         ("peak_rss_bytes", "rss_ratio_jax_over")):
        if jax_row.get(field) and reference_row.get(field):
            jax_row[f"{ratio}_{name}"] = jax_row[field] / reference_row[field]
    if jax_row.get("median_ms") and reference_row.get("median_ms"):
        jax_row[f"speedup_over_{name}"] = reference_row["median_ms"] / jax_row["median_ms"]
    if jax_row.get("trainable_params") is not None and reference_row.get("trainable_params") is not None:
        jax_row[f"trainable_params_match_{name}"] = jax_row["trainable_params"] == reference_row["trainable_params"]
    if jax_row.get("first_loss") and reference_row.get("first_loss") and jax_row["size"] == "tiny":
        # The largest relative difference over the loss and its parts (diffusion, prior, MLM).
        reference = reference_row["first_loss"]
        error = max(abs(value - reference[part]) / max(abs(reference[part]), 1e-30)
                    for part, value in jax_row["first_loss"].items())
        reference_row["loss_rel_error"] = error
        if name == "torch":
            jax_row["loss_rel_error"] = error


def mlm_rows(rows: list[dict]) -> list[dict]:
    """MLM's extra step time and extra FLOPs, per method and framework (rows with MLM on and off)."""
    out = []
    index = {(r["method"], r["mlm"], r["framework"], r["size"]): r for r in rows if r.get("median_ms")}
    for (method, mlm, framework, size), on in index.items():
        off = index.get((method, False, framework, size))
        if not mlm or off is None:
            continue
        entry = {"method": method, "size": size, "framework": framework, "mlm_batch": on.get("mlm_batch"),
                 "extra_time": on["median_ms"] / off["median_ms"] - 1,
                 "extra_ms": on["median_ms"] - off["median_ms"]}
        if on.get("mlm_branch_times_s"):  # the branch timed alone: how much of it the step hides
            entry["branch_alone_ms"] = 1000 * statistics.median(on["mlm_branch_times_s"])
        jax_on = index.get((method, True, "jax", size), on)
        jax_off = index.get((method, False, "jax", size), off)
        if jax_on.get("flops") and jax_off.get("flops"):
            masked = jax_on["flops"] - jax_off["flops"]
            entry.update(mlm_flops_masked=masked, extra_flops=masked / jax_off["flops"],
                         flops_share=masked / jax_on["flops"],
                         time_share=(on["median_ms"] - off["median_ms"]) / on["median_ms"])
            lowered_all, lowered_masked = jax_on.get("flops_lowered_all_positions"), jax_on.get("flops_lowered_masked")
            if lowered_all and lowered_masked:
                everywhere = masked + lowered_all - lowered_masked
                entry.update(mlm_flops_all_positions=everywhere, extra_flops_all_positions=everywhere / jax_off["flops"],
                             mlm_positions_masked=jax_on.get("mlm_positions_masked"),
                             mlm_positions_all=jax_on.get("mlm_positions_all"),
                             projection_flops_masked=jax_on.get("projection_flops_masked"),
                             projection_flops_all_positions=jax_on.get("projection_flops_all_positions"))
        out.append(entry)
    return out


def progress(row: dict) -> str:
    """A row as one progress line."""
    name = f"{row['size']} {row['method']} mlm={'on' if row['mlm'] else 'off'} {row['framework']}"
    if row.get("error"):
        return f"{name}: failed: {row['error']}"
    if row.get("unsupported"):
        return f"{name}: not run: {row['unsupported']}"
    return f"{name}: {row['median_ms']:.1f} ms/step" + (f", loss {row['first_loss']['loss']:.6g}"
                                                         if row.get("first_loss") else "")


# ---------------------------------------------------------------------------------------------------
# Markdown


def fmt(value, spec: str = ".3g", scale: float = 1.0, missing: str = "–") -> str:
    """``value / scale`` formatted with ``spec``; ``missing`` for None or a non-finite float."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value / scale, spec)


def markdown(result: dict) -> str:
    """README-ready tables: the machine, the step rows, MLM's cost, the sharded memory."""
    m = result["machine"]
    peak = result["matmul_peak"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    accelerator = f"{m['accelerator']} with " if m.get("accelerator") else ""
    lines = [f"Machine: {accelerator}{m['cpu']}, {m['cores']} cores, load average {m['load_average'][0]:.1f} at start, "
             f"{m.get('load_average_end', [float('nan')])[0]:.1f} at end; {versions}; "
             f"XLA_FLAGS={m['xla_flags'] or '(none)'}; {m['date']}."]
    chosen = sorted({f"{r['size']}: {k}={v!r}" for r in result["rows"]
                     for k, v in (r.get("compiler_options") or {}).items()})
    if chosen:  # mlmjax.aot.cpu_compiler_options
        lines[0] += f" XLA options the JAX steps were compiled with: {'; '.join(chosen)}."
    peaks = [f"{fw} {fmt(peak[fw]['flops_per_s'], '.1f', 1e9)} GFLOP/s" for fw in FRAMEWORKS if peak.get(fw)]
    threads = sorted({r["threads"] for r in result["rows"] if r.get("threads")})
    measured = next((peak[fw] for fw in FRAMEWORKS if peak.get(fw)), None)
    if peaks:
        dtype, size = measured.get("dtype", "float32"), measured.get("size", bench_torch.MATMUL_SIZE)
        lines.append(f"{dtype.capitalize()} {size}² matmul peak: {', '.join(peaks)}."
                     + (f" PyTorch intra-op threads: {', '.join(map(str, threads))}." if threads else ""))
    flax_rows = [r for r in result["rows"] if r["framework"] == "diffusers_flax" and r.get("versions")]
    if flax_rows:
        v = flax_rows[0]["versions"]
        attention = sorted({f"{r['size']} {r['attention']}" for r in flax_rows if r.get("attention")})
        lines.append(f"diffusers-Flax reference: diffusers {v.get('diffusers')}, transformers {v.get('transformers')}, "
                     f"jax {v.get('jax')}; attention: {', '.join(attention) or '–'}.")
    lines.append("")
    references = ["torch"] + (["diffusers_flax"] if flax_rows else [])
    if result["rows"]:
        lines += ["| size | method | MLM | framework | batch (+prior, MLM) | step ms median [IQR] | examples/s | "
                  "compile s | GFLOP/step | GFLOP/s (% peak) | peak memory GB | RSS GB | "
                  + "".join(f"JAX/{REFERENCES[name]} time | " for name in references) + "first loss |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(references) + "---|"]
        empty = "|" * (8 + len(references))
        for r in result["rows"]:
            devices = f" ({r['cpu_devices']} CPU devices)" if r.get("cpu_devices", 1) > 1 else ""
            head = f"| {r['size']} | {r['method']} | {'on' if r['mlm'] else 'off'} | {r['framework']}{devices} |"
            if r.get("error"):
                compiled = (f" (compiled: {fmt(r.get('compile_s'), '.0f')} s, {fmt(r.get('flops'), '.3g', 1e9)} "
                            f"GFLOP/step, peak {fmt(r.get('peak_memory_bytes'), '.2f', 1e9)} GB)"
                            if r.get("peak_memory_bytes") else "")
                lines.append(f"{head} failed: {r['error']}{compiled} {empty}")
                continue
            if r.get("unsupported"):
                lines.append(f"{head} not run: {r['unsupported']} {empty}")
                continue
            batch = f"{r['batch']}" + (f" (+{r['prior_batch']}" if r['prior_batch'] else " (+0") + \
                f", {r['mlm_batch']})"
            fraction = r.get("peak_fraction")
            loss = r.get("first_loss", {}).get("loss")
            loss_text = fmt(loss, ".5g") + (f" (Δ {r['loss_rel_error']:.1e})" if r.get("loss_rel_error") is not None
                                             else "")
            processes = r.get("process_medians_ms") or []
            spread = (f"; {len(processes)} processes {min(processes):.1f}–{max(processes):.1f}"
                      if len(processes) > 1 else "")
            lines.append(
                f"{head} {batch} | {r['median_ms']:.1f} [{r['q1_ms']:.1f}–{r['q3_ms']:.1f}]{spread} | "
                f"{fmt(r['examples_per_s'])} | {fmt(r.get('compile_s'), '.1f')} | {fmt(r['flops'], '.3g', 1e9)} | "
                f"{fmt(r['achieved_flops_per_s'], '.1f', 1e9)} ({fmt(fraction, '.0%')}) | "
                f"{fmt(r['peak_memory_bytes'], '.2f', 1e9)} | {fmt(r['peak_rss_bytes'], '.2f', 1e9)} | "
                + "".join(f"{fmt(r.get(f'time_ratio_jax_over_{name}'), '.2f')} | " for name in references)
                + f"{loss_text} |")
    if result["mlm"]:
        alone = any(e.get("branch_alone_ms") for e in result["mlm"])
        lines += ["", "| size | method | framework | MLM batch | extra step time | extra FLOPs (masked only) | "
                  "extra FLOPs (every position) | MLM share of time / of FLOPs |"
                  + (" extra ms / branch alone ms |" if alone else ""), "|---|---|---|---|---|---|---|---|"
                  + ("---|" if alone else "")]
        for e in result["mlm"]:
            lines.append(f"| {e['size']} | {e['method']} | {e['framework']} | {e['mlm_batch']} | "
                         f"{e['extra_time']:+.1%} | {fmt(e.get('extra_flops'), '+.1%')} | "
                         f"{fmt(e.get('extra_flops_all_positions'), '+.1%')} | "
                         f"{fmt(e.get('time_share'), '.1%')} / {fmt(e.get('flops_share'), '.1%')} |"
                         + (f" {e['extra_ms']:.1f} / {fmt(e.get('branch_alone_ms'), '.1f')} |" if alone else ""))
    if result["sharded_memory"]:
        lines += ["", "| compiled only (SD 1.5 shapes, no weights) | MLM | compute | mesh | batch (+prior) per step | "
                  "peak GiB per device | args / temp GiB | GFLOP/step | compile s |", "|---|---|---|---|---|---|---|---|---|"]
        for s in result["sharded_memory"]:
            dtype = f"{s.get('compute_dtype')}{' + remat' if s.get('remat') else ''}"
            head = f"| {s['method']} | {'on' if s['mlm'] else 'off'} | {dtype} | fsdp={s.get('devices')} |"
            if s.get("error"):
                lines.append(f"{head} failed: {s['error']} |||||")
                continue
            mem = s["memory_per_device"] or {}
            lines.append(f"{head} {s['batch']} (+{s['prior_batch']}) | {fmt(s['peak_bytes_per_device'], '.2f', 2**30)} | "
                         f"{fmt(mem.get('argument'), '.2f', 2**30)} / {fmt(mem.get('temp'), '.2f', 2**30)} | "
                         f"{fmt(s.get('flops'), '.4g', 1e9)} | {s['compile_s']:.0f} |")
    lines += _profile_tables([r for r in result["rows"] if r.get("profile")])
    return "\n".join(lines)


def _profile_tables(rows: list[dict], entries: int = 8) -> list[str]:
    """Where the profiled JAX steps' time goes (``--profile``): ms per step by kind of operation, and the
    ``entries`` costliest scopes (model and pass, or the function outside the models) and layers."""
    if not rows:
        return []
    lines = ["", "| JAX step profiled | where | wall ms | op ms | " + " | ".join(profiling.CATEGORIES) + " |",
             "|---|---|---|---|" + "---|" * len(profiling.CATEGORIES)]
    for r in rows:
        p = r["profile"]
        unmatched = p.get("unmatched_device_ms_per_step")
        where = p["where"] + (f" (+{unmatched:.1f} ms of other kernels)" if unmatched else "")
        lines.append(f"| {r['size']} {r['method']} MLM {'on' if r['mlm'] else 'off'} | {where} | "
                     f"{p['wall_ms_per_step']:.1f} | {p['op_ms_per_step']:.1f} | "
                     + " | ".join(fmt(p["by_category"].get(c), ".1f") for c in profiling.CATEGORIES) + " |")
    for key, title in (("by_scope", "costliest scopes"), ("by_layer", "costliest layers")):
        lines += ["", f"| JAX step profiled | {title}, ms per step |", "|---|---|"]
        for r in rows:
            top = list(r["profile"].get(key, {}).items())[:entries]
            lines.append(f"| {r['size']} {r['method']} MLM {'on' if r['mlm'] else 'off'} | "
                         + "; ".join(f"{name} {ms:.1f}" for name, ms in top) + " |")
    return lines


# ---------------------------------------------------------------------------------------------------
# Several runs as one report


def merge(results: list[dict]) -> dict:
    """Several ``--json`` results as one: the first run's machine and peak, every run's rows, and MLM's
    cost recomputed over all rows (MLM on and off may come from different runs)."""
    if not results:
        raise ValueError("no benchmark results to merge")
    rows = [row for result in results for row in result["rows"]]
    return {"machine": results[0]["machine"], "matmul_peak": results[0]["matmul_peak"], "rows": rows,
            "mlm": mlm_rows(rows), "sharded_memory": [s for result in results for s in result["sharded_memory"]]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="README tables of python -m mlmjax.bench --json files")
    parser.add_argument("results", nargs="+", help="JSON files written by python -m mlmjax.bench --json")
    args = parser.parse_args(argv)
    results = []
    for path in args.results:
        try:
            with open(path) as f:
                results.append(json.load(f))
        except (OSError, json.JSONDecodeError) as error:
            raise SystemExit(f"{path}: not a benchmark result ({error}); give files written by --json")
    print(markdown(merge(results)))


if __name__ == "__main__":
    sys.exit(main())
