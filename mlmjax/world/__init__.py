"""A miniature world of small procedural scenes whose ground truth is known.

A `Scene` (`scene.py`) is a coloured object (cat, dog, bird, fish, teapot, cup, ball, car) or the
novel concept (a gooseneck teapot pretraining never sees, class noun "teapot") in a background,
optionally wearing an item, optionally next to / on top of / in front of a second object, drawn in a
style. `render.py` draws it (numpy/PIL, 32 px for the tiny model, 64 px for figures), `captions.py`
writes and parses its captions and holds the world's MLM prompt set (`data/`, same layout as
`mlmjax/prompts/data`), and `evaluator.py` is a small CNN that reads the attributes back from an
image, so a tiny text-to-image model trained on this world can be scored on whether the concept keeps
its identity and shows the asked context.

Import the submodules directly; this package imports nothing heavy.
"""
