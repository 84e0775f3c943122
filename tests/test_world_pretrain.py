"""World pretraining: the caption corpus, the shared fitting step, and every stage end to end (tiny)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlmjax import pretrained as pretrained_lib
from mlmjax import tiny
from mlmjax.world import captions as captions_lib
from mlmjax.world import corpus as corpus_lib
from mlmjax.world import fitting, pretrain, pretrain_text, pretrain_vae
from mlmjax.world import scene as scene_lib


def test_training_captions_are_seeded_and_vary_in_detail():
    corpus = corpus_lib.build(64, seed=3)
    again = corpus_lib.build(64, seed=3)
    np.testing.assert_array_equal(corpus.images, again.images)
    indices = corpus.batch_indices(seed=1, step=5, batch_size=400)
    np.testing.assert_array_equal(indices, again.batch_indices(seed=1, step=5, batch_size=400))
    texts = corpus.captions(indices, seed=1, step=5)
    assert texts == again.captions(indices, seed=1, step=5)
    assert texts != corpus.captions(indices, seed=1, step=6)
    assert 0.05 < np.mean([t == "" for t in texts]) < 0.15  # EMPTY_PROB = 0.1
    framed = [t for t in texts if t and not t.startswith(("a ", "an "))]
    assert framed and all(t.startswith(("the ", "a ", "an ")) or " of " in t for t in framed)
    full = corpus.captions(indices, seed=1, step=5, drop_prob=0.0, empty_prob=0.0, frame_prob=0.0)
    for i, text in zip(indices[:50], full):  # every attribute said, and it parses back to the scene
        scene = corpus.scenes[i]
        parsed = captions_lib.scene_from_prompt(text)
        assert parsed.object == scene.object and parsed.color == scene.color
        assert parsed.background == scene.background


def test_stream_is_batch_indices_step_by_step():
    corpus = corpus_lib.build(16, seed=3)
    stream = corpus.stream(5, 4, lambda indices, step: {"indices": indices, "step": step})
    for step in range(3):
        batch = next(stream)
        assert batch["step"] == step
        np.testing.assert_array_equal(batch["indices"], corpus.batch_indices(5, step, 4))
    np.testing.assert_array_equal(corpus_lib.to_unit_range(np.array([0, 255], np.uint8)), [-1.0, 1.0])


def test_said_drops_attributes_with_their_fields():
    scene = scene_lib.Scene(object="cat", color="red", background="snow", wearing="hat", wearing_color="blue",
                            relation="next to", second_object="cup", second_color="green", style="dots")
    rng = np.random.default_rng(0)
    kept = [corpus_lib.said(scene, rng, drop_prob=0.5) for _ in range(200)]
    assert all(k.object == "cat" for k in kept)
    for k in kept:  # a dropped item takes its colour with it; the Scene stays valid
        assert (k.wearing is None) == (k.wearing_color is None)
        assert (k.relation is None) == (k.second_object is None) == (k.second_color is None)
    assert 0.35 < np.mean([k.background is None for k in kept]) < 0.65
    assert corpus_lib.said(scene, rng, drop_prob=0.0) == scene


def test_caption_file_has_no_empty_lines(tmp_path):
    path = tmp_path / "sub" / "captions.txt"
    corpus_lib.write_caption_file(str(path), 300, seed=0)
    lines = path.read_text().splitlines()
    assert len(lines) == 300 and all(lines)
    assert len(set(lines)) > 250


def test_fit_minimises_and_averages():
    target = jnp.arange(4.0)

    def loss(p, batch, rng):
        del batch, rng
        value = jnp.sum((p["w"] - target) ** 2)
        return value, {}

    def run_loop(step_fn, state, batches, steps):
        for _ in range(steps):
            state, metrics = step_fn(state, next(batches), jax.random.key(0))
        assert set(metrics) == {"loss", "grad_norm"}
        return state

    batches = iter(lambda: {}, None)
    schedule = fitting.Schedule(steps=400, learning_rate=0.1, warmup=10)
    trained = fitting.fit(loss, {"w": jnp.zeros(4)}, schedule, batches, run_loop)
    np.testing.assert_allclose(trained["w"], target, atol=1e-2)
    averaged = fitting.fit(loss, {"w": jnp.zeros(4)}, schedule, batches, run_loop, ema_decay=0.9)
    # The average lags the iterate but, after 400 steps with a window of ~10, sits on the target too.
    np.testing.assert_allclose(averaged["w"], target, atol=5e-2)
    assert isinstance(averaged["w"], np.ndarray)


_DATA_PARALLEL_FIT = """
import sys, jax, numpy as np
jax.config.update("jax_num_cpu_devices", int(sys.argv[1]))
from mlmjax.world import fitting
rng = np.random.default_rng(0)
x = rng.standard_normal((64, 8, 3)).astype(np.float32)  # 8 batches of 8 examples
y = x @ np.arange(1.0, 4.0, dtype=np.float32)
placed = []
def loss(p, batch, key):
    return jax.numpy.mean((batch["x"] @ p["w"] - batch["y"]) ** 2), {}
def run_loop(step_fn, state, batches, steps):
    for _ in range(steps):
        batch = next(batches)
        placed.append(len(batch["x"].sharding.device_set))
        state, _ = step_fn(state, batch, jax.random.key(0))
    return state
batches = ({"x": x[i % 8 * 8:(i % 8 + 1) * 8], "y": y[i % 8 * 8:(i % 8 + 1) * 8]} for i in range(10**6))
w = fitting.fit(loss, {"w": np.zeros(3, np.float32)}, fitting.Schedule(40, 0.05, warmup=5), batches, run_loop)["w"]
print(" ".join(map(repr, [placed[0], *w.tolist()])))
"""


def test_fit_splits_each_batch_over_the_devices_and_matches_one_device():
    def fit_on(devices: int) -> list[float]:
        out = subprocess.run([sys.executable, "-c", _DATA_PARALLEL_FIT, str(devices)], capture_output=True,
                             text=True, check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout
        return [float(v) for v in out.split()]

    one, two = fit_on(1), fit_on(2)
    assert one[0] == 1 and two[0] == 2  # the batch was split over both devices
    assert one[1:] != [0.0, 0.0, 0.0]
    np.testing.assert_allclose(two[1:], one[1:], rtol=1e-5)


def test_contrastive_loss_prefers_matching_pairs():
    eye = jnp.eye(4)
    loss, accuracy = pretrain_text.contrastive_loss(eye, eye, jnp.log(10.0))
    shuffled, shuffled_accuracy = pretrain_text.contrastive_loss(eye, eye[::-1], jnp.log(10.0))
    assert float(accuracy) == 1.0 and float(shuffled_accuracy) == 0.0
    assert float(loss) < 0.01 < float(shuffled)


def test_scaling_factor_is_inverse_sample_std():
    mean = np.zeros((500, 4, 4, 4), np.float32)
    logvar = np.full_like(mean, np.log(4.0))  # samples with std 2
    assert pretrain_vae.scaling_factor(mean, logvar) == pytest.approx(0.5, rel=0.02)


def test_cpu_devices_says_when_jax_has_already_started_with_other_devices(caplog):
    have = jax.local_device_count()  # this process's JAX has started: the split can no longer change
    pretrain._use_cpu_devices(have)
    assert caplog.messages == []
    pretrain._use_cpu_devices(have + 1)
    assert caplog.messages == [f"--cpu_devices={have + 1} ignored: JAX had already started with {have} device(s); "
                               "run the command in a fresh process to split the CPU"]
    assert jax.local_device_count() == have


def test_every_stage_runs_in_one_process_and_exports_the_embedded_default(tmp_path):
    workdir = tmp_path / "world"
    pretrain.main(["--workdir", str(workdir), "--corpus_size", "32", "--captions", "20", "--check_prompts", "2",
                   "--vae", "steps=2,batch_size=4", "--text", "steps=2,batch_size=4",
                   "--contextualizer", "max_steps=2,batch_size=4,log_every=1,heldout_size=4",
                   "--unet", "steps=2,batch_size=4"])
    summary = json.loads((workdir / "summary.json").read_text())
    assert set(summary) == set(pretrain.STAGES)
    assert summary["unet"]["steps"] == summary["unet"]["total_steps"] == 2
    assert 0 <= summary["unet"]["check_prompt_fidelity"] <= 1
    assert summary["contextualizer"]["steps"] == 2 and 0 <= summary["contextualizer"]["held_out_masked_accuracy"] <= 1
    for stage, folder in (("vae", "vae"), ("text", "text"), ("unet", "unet"), ("contextualizer", "ctx")):
        rows = [json.loads(line) for line in (workdir / folder / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
        assert summary[stage]["devices"] == jax.local_device_count() and summary[stage]["minutes"] >= 0
    model = pretrained_lib.load_pretrained(str(workdir / "model"))
    assert model.vae.config.scaling_factor == pytest.approx(summary["vae"]["scaling_factor"])
    for name, changes in tiny.WORLD.items():  # the world's architecture, not the tests'
        config = getattr(model, name).config.to_dict()
        assert {key: config[key] for key in changes} == changes
    assert os.path.isfile(workdir / "check.png")
    assert len((workdir / "captions.txt").read_text().splitlines()) == 20

    out = tmp_path / "embedded"
    pretrain.main(["--workdir", str(workdir), "--export", str(out)])
    assert sorted(os.listdir(out)) == ["class", "concept", "contextualizer", "model"]
    assert len(os.listdir(out / "concept")) == pretrain.NUM_CONCEPT_PHOTOS
    exported = pretrained_lib.load_pretrained(str(out / "model"))
    # Shipped in half precision: the weights agree to float16's rounding.
    np.testing.assert_allclose(np.asarray(exported.params["vae"]["decoder"]["conv_out"]["kernel"], np.float32),
                               model.params["vae"]["decoder"]["conv_out"]["kernel"], rtol=1e-3, atol=1e-4)


def test_a_stage_that_needs_an_earlier_one_says_which(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(["--workdir", str(tmp_path), "--stages", "contextualizer"])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and "captions.txt: the contextualizer stage needs the captions and text stages first" \
        in message
    with pytest.raises(SystemExit, match="key=value pairs"):
        pretrain.main(["--workdir", str(tmp_path), "--contextualizer", "max_steps"])


def test_export_without_a_contextualizer_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(["--workdir", str(tmp_path / "world"), "--export", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and "ctx/contextualizer: pretrain the contextualizer first" in message
    assert not (tmp_path / "out").exists()


def test_unknown_stage_and_option_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown stage"):
        pretrain.main(["--workdir", str(tmp_path), "--stages", "vae,clip"])
    with pytest.raises(SystemExit, match="unknown option 'step'"):
        pretrain.main(["--workdir", str(tmp_path), "--stages", "vae", "--vae", "step=3"])


def test_a_stage_run_again_keeps_the_earlier_logs(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "metrics.jsonl").write_text('{"step": 1}\n')
    folder = pretrain._fresh_log_folder(str(tmp_path), "unet")
    assert os.listdir(folder) == [] and (tmp_path / "unet.1" / "metrics.jsonl").is_file()
    (tmp_path / "unet" / "metrics.jsonl").write_text('{"step": 1}\n')
    pretrain._fresh_log_folder(str(tmp_path), "unet")
    assert sorted(os.listdir(tmp_path)) == ["unet", "unet.1", "unet.2"]
