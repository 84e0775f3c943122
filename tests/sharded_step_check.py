"""Run by tests/test_sharding.py in a process with 8 host devices: a DreamBooth + MLM state created
straight into its FSDP shardings, and one step of it on several meshes against the single-device step.
Prints one JSON line of measurements.

The model is the tiny one made smaller, with random weights: a UNet of one cross-attention block each
way (and the mid block), a one-layer text encoder, a one-block contextualizer. Each step compiles in a
fraction of the embedded model's time, and FSDP still has parameters to shard: the 49,408-row token
table, the up block's 3×3×64×32 convolution, the contextualizer's vocabulary projection.
"""

import collections
import concurrent.futures
import dataclasses
import json
import math
import os
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mlmjax import data, method, pretrained, sharding, tiny  # noqa: E402
from mlmjax import train_step as train_step_lib  # noqa: E402
from mlmjax.models import contextualizer as contextualizer_lib  # noqa: E402
from test_train_step import load_config  # noqa: E402

MESHES = [(8, 1, 1), (2, 4, 1), (1, 8, 1)]
SMALL_UNET = dict(tiny.UNET_CONFIG, down_block_types=["CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D"],
                  block_out_channels=[32])
SMALL_TEXT_ENCODER = dict(tiny.TEXT_ENCODER_CONFIG, num_hidden_layers=1)
SMALL_CONTEXTUALIZER = contextualizer_lib.ContextualizerConfig(hidden_size=32, num_blocks=1, num_heads=4, ffn_size=64)


def relative_error(a, b) -> float:
    a = np.concatenate([np.ravel(x).astype(np.float64) for x in jax.tree.leaves(a)])
    b = np.concatenate([np.ravel(x).astype(np.float64) for x in jax.tree.leaves(b)])
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def small_model() -> pretrained.Pretrained:
    model = tiny.tiny_pretrained()
    params = dict(model.params)
    modules = {}
    for seed, (name, config) in enumerate((("unet", SMALL_UNET), ("text_encoder", SMALL_TEXT_ENCODER))):
        modules[name] = pretrained.build_component(name, config)
        params[name] = pretrained.init_component(name, modules[name], seed)
    return dataclasses.replace(model, params=params, **modules)


def small_contextualizer(folder: str) -> str:
    """A random one-block contextualizer saved in ``folder`` (drawn with numpy: ``module.init`` would
    compile an initialiser)."""
    rng = np.random.default_rng(0)
    abstract = contextualizer_lib.abstract_params(contextualizer_lib.Contextualizer(SMALL_CONTEXTUALIZER))
    params = jax.tree.map(lambda x: (0.02 * rng.standard_normal(x.shape)).astype(np.float32), abstract)
    mask = rng.standard_normal(SMALL_CONTEXTUALIZER.hidden_size).astype(np.float32)
    contextualizer_lib.save_contextualizer(folder, SMALL_CONTEXTUALIZER, params, mask)
    return folder


def placement(state, mesh) -> dict:
    """How a freshly created state lies on ``mesh``: its specs against :func:`sharding.parameter_spec`,
    the devices each leaf spans, and the share of a sharded leaf that one device holds."""
    leaves = jax.tree.leaves(state)
    expected = jax.tree.leaves(sharding.state_shardings(state, mesh))
    ways = [np.prod([mesh.shape[axis] for axis in leaf.sharding.spec if axis]) for leaf in leaves]
    held = [max(s.data.size for s in leaf.addressable_shards) / leaf.size for leaf in leaves]
    return {
        "specs_as_configured": all(leaf.sharding == s for leaf, s in zip(leaves, expected)),
        "opt_state_specs": sorted({str(leaf.sharding.spec) for leaf in jax.tree.leaves(state.opt_state)}),
        "devices_per_leaf": sorted({len(leaf.sharding.device_set) for leaf in leaves}),
        "sharded_leaves": int(sum(w > 1 for w in ways)),
        # The most of a sharded leaf that any device holds (1/8 on the 8-way FSDP mesh).
        "largest_shard_fraction": float(max(h for h, w in zip(held, ways) if w > 1)),
    }


def collective_count(hlo_text: str) -> dict[str, int]:
    """The compiled step's collectives by kind (an async pair counted once)."""
    found = re.findall(r"= [^=]*? (all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)(?:-start)?\(",
                       hlo_text)
    return dict(collections.Counter(found))


def all_reduced_elements(hlo_text: str) -> int:
    """How many array elements the compiled step's all-reduces sum over the devices (async pairs once)."""
    total = 0
    for line in hlo_text.splitlines():
        head = re.match(r"\s*%\S+ = (.*?) all-reduce(?:-start)?\(", line)
        if head:
            total += sum(math.prod(int(d) for d in dims.split(",") if d)
                         for dims in re.findall(r"[a-z]+[0-9]*\[([0-9,]*)\]", head.group(1)))
    return total


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    started = time.perf_counter()
    embedded = tiny.embedded_assets()
    config = load_config("dreambooth")  # UNet + text encoder + token train: FSDP has something to shard
    config.concept.token, config.concept.class_noun = "<concept>", embedded.class_noun
    config.batch_size = 8  # divides 8 devices; the MLM batch of 25 does not (replicated)
    config.learning_rate = 1e-4  # a visible update
    fsdp = sharding.make_mesh(dict(zip(sharding.AXES, MESHES[-1])))
    # 16-pixel images: 8×8 latents, a quarter of the UNet's work at the tiny model's 32 pixels.
    setup = method.build(config, small_model(), concept_images=data.load_images(embedded.concept_images, 16),
                         class_images=data.load_images(embedded.class_images, 16),
                         contextualizer_folder=small_contextualizer(tempfile.mkdtemp()), mesh=fsdp)
    out = {"created": placement(setup.state, fsdp), "meshes": {}, "seconds": {"setup": time.perf_counter() - started}}
    batch, rng = setup.make_batch(0), jax.random.key(0)
    initial = jax.device_get(setup.state)  # host copy: each mesh's step donates its own

    # One step per mesh, plus the single-device reference: traced one by one, compiled concurrently
    # (XLA compiles release the GIL; the compiles are most of this check's time).
    runs = {"reference": (initial, batch, jax.jit(train_step_lib.train_step).lower(initial, batch, rng))}
    for shape in MESHES:
        mesh = sharding.make_mesh(dict(zip(sharding.AXES, shape)))
        # The FSDP mesh steps the state as created; the others a copy from the host.
        state = setup.state if mesh == fsdp else sharding.shard_state(initial, mesh)
        placed = sharding.shard_batch(batch, mesh)
        runs[shape] = (state, placed, sharding.jit_step(train_step_lib.train_step, state, mesh).lower(state, placed, rng))
    compiling = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(runs)) as pool:
        executables = dict(zip(runs, pool.map(lambda run: run[2].compile(), runs.values())))
    out["seconds"]["compile"] = time.perf_counter() - compiling

    reference_state, reference = executables["reference"](initial, batch, rng)
    out["loss"] = float(reference["loss"])
    out["token_table_elements"] = int(initial.params["text_encoder"]["embeddings"]["token_embedding"]["embedding"].size)
    reference_flops = executables["reference"].cost_analysis()["flops"]
    for shape in MESHES:
        state, placed, _ = runs[shape]
        hlo_text = executables[shape].as_text()
        new_state, metrics = executables[shape](state, placed, rng)
        specs = {str(leaf.sharding.spec) for leaf in jax.tree.leaves(new_state.params)}
        mesh = placed["input_ids"].sharding.mesh
        kept = all(a.sharding == b for a, b in
                   zip(jax.tree.leaves(new_state), jax.tree.leaves(sharding.state_shardings(initial, mesh))))
        out["meshes"][str(shape)] = {
            "loss_error": abs(float(metrics["loss"]) - out["loss"]) / abs(out["loss"]),
            "mlm_loss_error": abs(float(metrics["loss_mlm"]) - float(reference["loss_mlm"])) / float(reference["loss_mlm"]),
            "params_error": relative_error(new_state.params, reference_state.params),
            "update_error": relative_error(jax.tree.map(jnp.subtract, new_state.params, initial.params),
                                           jax.tree.map(jnp.subtract, reference_state.params, initial.params)),
            "opt_state_error": relative_error(new_state.opt_state, reference_state.opt_state),
            "param_specs": sorted(specs), "shardings_kept": kept,
            "batch_spec": str(placed["input_ids"].sharding.spec),
            "mlm_batch_spec": str(placed["mlm_input_ids"].sharding.spec),
            # One device's share of the step's FLOPs (XLA's count of its partitioned program).
            "flops_share": executables[shape].cost_analysis()["flops"] / reference_flops,
            "collectives": collective_count(hlo_text),
            "all_reduced_elements": all_reduced_elements(hlo_text),
        }
    out["seconds"]["total"] = time.perf_counter() - started
    print(json.dumps(out))


if __name__ == "__main__":
    main()
