"""Helpers shared by the tests: a numerical error measure, and a workdir as training leaves it."""

import numpy as np


def relative_error(a, b) -> float:
    """||a - b||₂ / ||b||₂, computed in float64 so the metric adds no rounding of its own."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def save_untrained_run(workdir: str, step: int, *, perturb_seed: int | None = None) -> None:
    """A TI workdir on the embedded model as training leaves it, checkpointed at ``step`` without
    training (no compile): the initial concept vector, or a random one with ``perturb_seed``."""
    import jax

    from mlmjax import checkpoint as checkpoint_lib
    from mlmjax import method as method_lib
    from mlmjax import pretrained as pretrained_lib
    from mlmjax import tiny
    from mlmjax import workdir as workdir_lib
    from test_train_step import load_config

    config = load_config("ti")
    config.mlm.weight = 0.0
    embedded = tiny.embedded_assets()
    config.pretrained, config.concept.images, config.resolution = embedded.model, embedded.concept_images, 32
    config.mlm.contextualizer = embedded.contextualizer
    model = pretrained_lib.load_pretrained(config.pretrained)
    built = method_lib.build_state(config, model, contextualizer_folder=None)
    params = built.state.params
    if perturb_seed is not None:
        rng = np.random.default_rng(perturb_seed)
        params = jax.tree.map(lambda x: np.asarray(x) + rng.standard_normal(x.shape).astype(np.float32), params)
    identity = workdir_lib.identity(config, workdir_lib.fingerprints(config))
    workdir_lib.write_run_files(workdir, config, identity)
    checkpointer = checkpoint_lib.Checkpointer(workdir, async_save=False)
    checkpointer.save(step, params=params, opt_state=built.state.opt_state, rng=jax.random.key(0), data={},
                      run=identity)
    checkpointer.close()
