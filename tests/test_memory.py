"""Peak memory of a full-size step, from XLA's compiled memory analysis (SD 1.5 shapes, no weights).

A guard on what the benchmark reports: a change to the step that keeps more activations alive shows
here, not only in the next benchmark run (session 27: encoding the MLM prompts in the UNet prompts'
text-encoder pass held the MLM branch's activations through the UNet, +1.03 GiB for TI + MLM).
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sd15_ti_with_mlm_peaks_where_it_did(tmp_path):
    """TI (batch 4 at 512 px) + MLM (batch 25) at SD 1.5 shapes, float32, one device: 9.38 GiB
    (session 17 on; PyTorch's step peaks at 12 GB); 0.1 GiB of slack for XLA's scheduling."""
    out = tmp_path / "memory.json"
    result = subprocess.run(
        [sys.executable, "-m", "mlmjax.bench", "--size", "sd15", "--compile_only", "--methods", "ti",
         "--mlm", "on", "--nocount_flops", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 0, result.stderr[-2000:]
    (row,) = json.loads(out.read_text())["sharded_memory"]  # the compiled-only rows
    assert (row["method"], row["mlm"], row["batch"], row["mlm_batch"], row["devices"]) == ("ti", True, 4, 25, 1)
    assert 8.5 * 2**30 < row["peak_bytes_per_device"] <= 9.5 * 2**30, row["peak_bytes_per_device"] / 2**30
    # Only the memory is asked for: the step is not lowered again to count its FLOPs (30 s saved).
    assert row["flops"] is None and row["flops_compiled"] > 1e12
