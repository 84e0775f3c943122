"""Prompt set, synthetic captions, diffusion and evaluation prompts (pure Python, fast).

Statistical checks use fixed seeds, so they are deterministic; their thresholds are the 99.9%
quantiles of the test statistic under a correct sampler, so a change of seed fails 1 time in 1000.
"""

import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from mlmjax.prompts import (
    DATA_DIR,
    SLOT,
    UNPREFIXED_TYPES,
    PromptSet,
    caption_stream,
    class_prompt,
    diffusion_prompt,
    eval_prompts,
    read_caption_file,
    synthetic_captions,
    synthetic_set,
    ti_templates,
    with_article,
)
from mlmjax.prompts.templates import read_format_lines, read_lines

OURS = {
    "pet": {"backgrounds": 552, "human_interactions": 3528, "relations": 30240, "styles": 378,
            "wearings": 4560},
    "nonliving": {"backgrounds": 552, "human_interactions": 4176, "relations": 30240, "styles": 378,
                  "creatives": 117},
}
PAPER = {
    "pet": {"backgrounds": 552, "human_interactions": 3528, "relations": 29376, "styles": 378,
            "wearings": 4560},
    "nonliving": {"backgrounds": 552, "human_interactions": 4176, "relations": 29376, "styles": 378,
                  "creatives": 117},
}
PHRASE = "<dog6> dog"
Z999 = 3.090  # one-sided 99.9% normal quantile


def chi2_critical(df: int) -> float:
    """99.9% quantile of chi-square(df), Wilson-Hilferty approximation (good to ~1% for df >= 3)."""
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + Z999 * math.sqrt(c)) ** 3


def chi2(counts: np.ndarray) -> float:
    expected = counts.sum() / len(counts)
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.fixture(scope="module", params=["pet", "nonliving"])
def prompt_set(request) -> PromptSet:
    return PromptSet.load(request.param)


def test_counts_match_ours_and_paper_magnitudes(prompt_set):
    family = prompt_set.family
    assert prompt_set.types == list(OURS[family])
    assert {t: prompt_set.count(t) for t in prompt_set.types} == OURS[family]
    assert prompt_set.size == sum(OURS[family].values())
    for kind, paper in PAPER[family].items():
        assert abs(prompt_set.count(kind) / paper - 1) <= 0.25, kind


def test_every_line_has_one_slot_and_lines_are_unique(prompt_set):
    for kind in prompt_set.types:
        lines = prompt_set.all_prompts(kind)
        assert len(lines) == prompt_set.count(kind)
        assert len(set(lines)) == len(lines), kind
        assert all(line.count(SLOT) == 1 for line in lines), kind
        assert all("{" not in line and "  " not in line for line in lines), kind
    filled = prompt_set.all_prompts("styles", PHRASE)
    assert all(PHRASE in s and SLOT not in s for s in filled)


def test_examples_from_the_paper_exist():
    pet, nonliving = PromptSet.load("pet"), PromptSet.load("nonliving")
    assert "a chef is petting <new1>" in pet.all_prompts("human_interactions")
    assert "<new1> wearing a red santa hat" in pet.all_prompts("wearings")
    assert "<new1> dressed in an orange space suit" in pet.all_prompts("wearings")
    assert "<new1> is painted by a ninja" in nonliving.all_prompts("human_interactions")
    assert "a chef is holding <new1>" in nonliving.all_prompts("human_interactions")
    creatives = nonliving.all_prompts("creatives")
    assert {"a <new1> in a cross shape", "a cube shaped <new1>", "an origami <new1>"} <= set(creatives)


def test_sampling_is_deterministic_by_seed(prompt_set):
    a = prompt_set.sample(np.random.default_rng(3), 50, PHRASE)
    b = prompt_set.sample(np.random.default_rng(3), 50, PHRASE)
    c = prompt_set.sample(np.random.default_rng(4), 50, PHRASE)
    assert a == b and a != c
    assert len(a) == 50 and all(s.count(PHRASE) == 1 and SLOT not in s for s in a)
    typed = prompt_set.sample_typed(np.random.default_rng(3), 50, PHRASE)
    assert [p.text for p in typed] == a


def test_types_are_uniform(prompt_set):
    n = 20_000
    kinds = [p.type for p in prompt_set.sample_typed(np.random.default_rng(0), n, PHRASE)]
    counts = np.array([kinds.count(t) for t in prompt_set.types])
    assert chi2(counts) < chi2_critical(len(counts) - 1)


def test_lines_are_uniform_within_a_type():
    creatives = PromptSet.load("nonliving", types=["creatives"])
    lines = creatives.all_prompts("creatives", PHRASE)
    n = 100 * len(lines)
    drawn = creatives.sample(np.random.default_rng(1), n, PHRASE)
    counts = np.array([drawn.count(s) for s in lines])
    assert counts.sum() == n
    assert chi2(counts) < chi2_critical(len(lines) - 1)


def test_prefix_applied_only_to_prefixed_types(prompt_set):
    prefixes = read_format_lines(DATA_DIR / "mlm_prefixes.txt")
    assert len(prefixes) == 12 and len(set(prefixes)) == 12
    heads = {p.split("{}")[0]: p for p in prefixes}
    lines = {t: set(prompt_set.all_prompts(t, PHRASE)) for t in prompt_set.types}
    used = set()
    for text, kind in prompt_set.sample_typed(np.random.default_rng(5), 2000, PHRASE):
        if kind in UNPREFIXED_TYPES:
            assert text in lines[kind]
            continue
        matches = [h for h in heads if text.startswith(h) and text[len(h):] in lines[kind]]
        assert matches, text
        used.update(heads[h] for h in matches)
    assert used == set(prefixes)


def test_count_distribution_is_that_of_every_prompt_written_out(prompt_set):
    """Words per drawn prompt: the law from lines and prefixes counted apart equals the one from
    every (type, line, prefix) prompt written out, prefixes only on the prefixed types."""
    def words(texts):
        return np.array([len(t.split()) for t in texts])

    expected = np.zeros(80)
    for kind in prompt_set.types:
        lines = prompt_set.all_prompts(kind, PHRASE)
        texts = lines if kind in UNPREFIXED_TYPES else [p.format(line) for line in lines for p in prompt_set.prefixes]
        expected += np.bincount(words(texts), minlength=80) / len(texts) / len(prompt_set.types)
    law = prompt_set.count_distribution(PHRASE, words)
    np.testing.assert_allclose(law, expected[:law.size], rtol=0, atol=1e-12)
    assert expected[law.size:].sum() == 0 and law.sum() == pytest.approx(1.0)


def test_type_ablation_removes_a_type():
    ps = PromptSet.load("pet", types=["backgrounds", "styles", "relations"])
    assert ps.types == ["backgrounds", "relations", "styles"]
    kinds = {p.type for p in ps.sample_typed(np.random.default_rng(0), 300, PHRASE)}
    assert kinds == set(ps.types)
    with pytest.raises(ValueError, match="unknown or empty caption types"):
        PromptSet.load("pet", types=["creatives"])


def test_per_type_size_ablation():
    full = PromptSet.load("pet")
    small = PromptSet.load("pet", per_type_size=5, seed=11)
    assert small.types == full.types
    assert all(small.count(t) == 5 for t in small.types) and small.size == 25
    for kind in small.types:
        kept = small.all_prompts(kind)
        assert set(kept) <= set(full.all_prompts(kind))
    again = PromptSet.load("pet", per_type_size=5, seed=11)
    other = PromptSet.load("pet", per_type_size=5, seed=12)
    assert all(again.all_prompts(t) == small.all_prompts(t) for t in small.types)
    assert any(other.all_prompts(t) != small.all_prompts(t) for t in small.types)
    one = PromptSet.load("pet", per_type_size=1, types=["relations"], seed=0)
    (line,) = one.all_prompts("relations")
    drawn = one.sample(np.random.default_rng(0), 40, SLOT)
    assert all(s.endswith(line) for s in drawn)
    with pytest.raises(ValueError, match="per_type_size"):
        PromptSet.load("pet", per_type_size=0)


def test_world_is_a_family_read_from_its_own_folder():
    from mlmjax.world import captions

    everything = captions.world_prompt_set("all")
    assert everything.family == "world"
    assert everything.types == ["backgrounds", "wearings", "relations", "styles"]
    assert [everything.count(t) for t in everything.types] == [12, 96, 192, 20] and everything.size == 320
    assert everything.prefixes == captions.PREFIXES  # the world's, not DATA_DIR's 12
    # Customization runs read the training split: the held-out evaluation contexts are left out.
    world = PromptSet.load("world")
    train = captions.world_prompt_set("train")
    assert world.family == train.family == "world" and world.types == everything.types
    assert all(world.all_prompts(t) == train.all_prompts(t) for t in world.types)
    assert 0 < world.size < everything.size
    assert all(set(world.all_prompts(t)) < set(everything.all_prompts(t)) for t in world.types)
    held_out = captions.eval_prompts("<new1>")
    assert held_out and not set(held_out) & {p for t in world.types for p in world.all_prompts(t)}


def test_world_restriction_and_data_dir(tmp_path):
    from mlmjax.prompts.prompt_set import WORLD_DATA_DIR

    ps = PromptSet.load("world", types=["styles", "backgrounds"], per_type_size=3, seed=4)
    assert ps.types == ["backgrounds", "styles"] and ps.size == 6
    assert set(ps.all_prompts("styles")) <= set(PromptSet.load("world").all_prompts("styles"))
    with pytest.raises(ValueError, match="unknown or empty caption types"):
        PromptSet.load("world", types=["creatives"])
    # A user's data_dir applies to "world" as to the others: its templates, not the shipped ones.
    copy = Path(shutil.copytree(WORLD_DATA_DIR, tmp_path / "world"))
    (copy / "templates" / "world_train.txt").write_text("styles: <new1> in the {styles} style\n", encoding="utf-8")
    mine = PromptSet.load("world", data_dir=copy)
    assert mine.types == ["styles"] and mine.all_prompts("styles")[0] == "<new1> in the outline style"
    with pytest.raises(FileNotFoundError, match=re.escape(str(DATA_DIR / "templates" / "world_train.txt"))):
        PromptSet.load("world", data_dir=DATA_DIR)  # the paper's folder has no world templates


@pytest.fixture()
def data_copy(tmp_path) -> Path:
    return Path(shutil.copytree(DATA_DIR, tmp_path / "data"))


def _append(path: Path, line: str) -> int:
    with path.open("a", encoding="utf-8") as f:
        f.write(line + "\n")
    return len(path.read_text(encoding="utf-8").splitlines())


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_user_data_dir_loads(data_copy):
    _append(data_copy / "templates" / "pet.txt", "toys: <new1> playing with {a:objects}")
    ps = PromptSet.load("pet", data_dir=data_copy)
    assert ps.count("toys") == 70 and "<new1> playing with an umbrella" in ps.all_prompts("toys")


def test_template_without_slot_names_file_and_line(data_copy):
    path = data_copy / "templates" / "pet.txt"
    line = _append(path, "styles: a {colors} dog in the {styles} style")
    with pytest.raises(ValueError) as exc:
        PromptSet.load("pet", data_dir=data_copy)
    assert f"{path}:{line}:" in _one_line(exc) and "no <new1> slot" in str(exc.value)


def test_template_with_two_slots_or_unknown_slot(data_copy):
    path = data_copy / "templates" / "nonliving.txt"
    line = _append(path, "creatives: <new1> next to <new1>")
    with pytest.raises(ValueError, match=re.escape(f"{path}:{line}: template has 2 <new1> slots")):
        PromptSet.load("nonliving", data_dir=data_copy)
    path.write_text("creatives: <new2> in a box\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{path}:1: unknown slot <new2>")):
        PromptSet.load("nonliving", data_dir=data_copy)


def test_missing_files_and_bad_words(data_copy):
    (data_copy / "words" / "colors.txt").unlink()
    with pytest.raises(FileNotFoundError) as exc:
        PromptSet.load("pet", data_dir=data_copy)
    assert _one_line(exc) == f"{data_copy / 'words' / 'colors.txt'}: file not found"
    with pytest.raises(FileNotFoundError, match="file not found"):
        PromptSet.load("pet", data_dir=data_copy / "nowhere")
    shutil.copy(DATA_DIR / "words" / "colors.txt", data_copy / "words" / "colors.txt")
    words = data_copy / "words" / "relations.txt"
    line = _append(words, "behind")
    with pytest.raises(ValueError, match=re.escape(f"{words}:{line}: duplicate word 'behind'")):
        PromptSet.load("pet", data_dir=data_copy)
    with pytest.raises(ValueError, match="unknown prompt family"):
        PromptSet.load("plants")


def test_synthetic_captions():
    synthetic = synthetic_set()
    assert synthetic.types == ["solo_act", "backgrounds", "relations", "interact", "wearings", "styles"]
    assert all(synthetic.count(t) >= 100_000 for t in synthetic.types)
    assert synthetic.count("solo_act") == 100_256
    captions = synthetic_captions(np.random.default_rng(0), 500)
    assert captions == synthetic_captions(np.random.default_rng(0), 500)
    assert all(SLOT not in c and "<" not in c and "{" not in c for c in captions)
    assert "a man reading a book" in synthetic.lines("solo_act")
    n = 12_000
    kinds = [t for t, _ in synthetic.sample(np.random.default_rng(2), n)]
    counts = np.array([kinds.count(t) for t in synthetic.types])
    assert chi2(counts) < chi2_critical(len(counts) - 1)


def test_synthetic_templates_reject_slots(data_copy):
    path = data_copy / "templates" / "synthetic.txt"
    line = _append(path, "styles: <new1> in the {styles} style")
    with pytest.raises(ValueError, match=re.escape(f"{path}:{line}: template has 1 <new1> slot, expected 0")):
        synthetic_set(data_copy)


def _take(stream, n):
    return [next(stream) for _ in range(n)]


def test_caption_stream_mixes_at_ratio():
    user = [f"user caption {i}" for i in range(7)]
    n, ratio = 20_000, 0.3
    stream = caption_stream(np.random.default_rng(0), user, synthetic_ratio=ratio)
    items = [next(stream) for _ in range(n)]
    frac = sum(s not in user for s in items) / n
    # Binomial: the fraction's std is sqrt(p(1-p)/n) = 0.0032; allow a two-sided 99.9% band.
    assert abs(frac - ratio) < 3.29 * math.sqrt(ratio * (1 - ratio) / n)
    assert set(user) <= set(items)
    assert all(s in user for s in _take(caption_stream(np.random.default_rng(1), user, 0.0), 200))
    assert not any(s in user for s in _take(caption_stream(np.random.default_rng(1), [], 1.0), 200))
    with pytest.raises(ValueError, match="user_captions is empty"):
        next(caption_stream(np.random.default_rng(0), [], 0.3))
    with pytest.raises(ValueError, match="synthetic_ratio"):
        next(caption_stream(np.random.default_rng(0), user, 1.5))


def test_read_caption_file(tmp_path):
    path = tmp_path / "coco.txt"
    path.write_text("A man riding a horse.\n\n  Two dogs play.  \n", encoding="utf-8")
    assert read_caption_file(path) == ["A man riding a horse.", "Two dogs play."]
    with pytest.raises(FileNotFoundError, match="caption file not found"):
        read_caption_file(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(ValueError, match="has no captions"):
        read_caption_file(tmp_path / "empty.txt")


WORD_LIST_SIZES = {
    "humans": 72, "humans_extra": 254, "animals": 90, "objects": 70, "colors": 24, "relations": 18,
    "backgrounds": 138, "backgrounds_extra": 215, "styles": 126, "styles_extra": 213,
    "wearings": 142, "outfits": 24, "wearables_extra": 116, "pet_interactions": 49,
    "object_interactions_active": 29, "object_interactions_passive": 29, "creatives": 33,
    "shapes": 18, "solo_activities": 241,
}


def test_word_lists_are_clean_lower_case_ascii():
    files = sorted((DATA_DIR / "words").glob("*.txt"))
    assert {f.stem for f in files} == set(WORD_LIST_SIZES)
    for path in files:
        words = [w for _, w in read_lines(path)]
        assert len(words) == WORD_LIST_SIZES[path.stem], path.name
        assert len(set(words)) == len(words), path.name
        for w in words:
            assert w.isascii() and w == w.lower() and w == " ".join(w.split()), (path.name, w)
            assert re.fullmatch(r"[a-z0-9 \-]+", w), (path.name, w)
    for base in ("humans", "backgrounds", "styles", "wearings"):
        extra = "wearables_extra" if base == "wearings" else f"{base}_extra"
        a = {w for _, w in read_lines(DATA_DIR / "words" / f"{base}.txt")}
        b = {w for _, w in read_lines(DATA_DIR / "words" / f"{extra}.txt")}
        assert not a & b, (base, a & b)


def test_articles():
    assert with_article("orange") == "an orange"
    assert with_article("red") == "a red"
    assert with_article("unicyclist") == "a unicyclist"
    assert with_article("umbrella") == "an umbrella"
    assert with_article("hour glass") == "an hour glass"


def test_diffusion_class_and_eval_prompts():
    templates = ti_templates()
    assert len(templates) == 27 and len(set(templates)) == 27 and templates[0] == "a photo of a {}"
    rng = np.random.default_rng(0)
    drawn = [diffusion_prompt(rng, PHRASE) for _ in range(300)]
    assert set(drawn) == {t.format(PHRASE) for t in templates}
    assert [diffusion_prompt(np.random.default_rng(9), PHRASE) for _ in range(2)] == [
        diffusion_prompt(np.random.default_rng(9), PHRASE)] * 2
    assert class_prompt("dog") == "a picture of a dog"
    for kind in ("living", "nonliving"):
        prompts = eval_prompts(kind)
        assert len(prompts) == 25 and len(set(prompts)) == 25
        assert prompts[0] == "a {} in the jungle" and prompts[-1] == "a cube shaped {}"
    assert eval_prompts("living", PHRASE)[11] == "a <dog6> dog wearing a santa hat"
    assert eval_prompts("nonliving", PHRASE)[12] == "a <dog6> dog with the Eiffel Tower in the background"
    with pytest.raises(ValueError, match="unknown eval prompt kind"):
        eval_prompts("plants")
