r"""Contextualizer pretraining: masked language modelling on CLIP text features (PAPER.md §1.2-1.3).

    python -m mlmjax.train --config configs/contextualizer.py:tiny --workdir /tmp/ctx-tiny
    python -m mlmjax.train --config configs/contextualizer.py:world --workdir /tmp/world/ctx \
        --config.pretrained=/tmp/world/model --config.captions=/tmp/world/captions.txt
    python -m mlmjax.train --config configs/contextualizer.py --workdir /data/ctx \
        --config.pretrained=/data/sd15 --config.captions=/data/coco_caption_raw.txt

The result, ``<workdir>/contextualizer``, is what a customization run takes as
``--config.mlm.contextualizer``. Option ``tiny`` (after the file name) shrinks the run for a CPU: the
embedded tiny model, batch 32, 300 steps at lr 1e-3. Option ``world`` is how the embedded default's
contextualizer was made (the ``contextualizer`` stage of ``python -m mlmjax.world.pretrain`` runs it
on the model and captions of its earlier stages): the world's scene captions mixed, as the authors
mix COCO with templates, with the world's synthetic single-context captions; a tiny contextualizer,
batch 32, 1200 steps at lr 1e-3.
"""

from mlmjax.world import captions as world_captions

import ml_collections

from mlmjax import config as config_lib


def get_config(options: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "contextualizer"
    c.pretrained = ""  # a diffusers-layout folder (only text_encoder/ and tokenizer/ are read); empty: the embedded tiny model
    c.captions = ""  # one caption a line (the authors': COCO Karpathy, coco_caption_raw.txt); empty: synthetic only
    c.synthetic_ratio = 0.3  # the authors' synth_prob; ignored (1.0) when captions is empty
    # A prompt data folder whose templates/synthetic.txt and words/ make the synthetic captions; empty:
    # mlmjax's own (mlmjax/prompts/data), the authors' six caption types.
    c.synthetic_data = ""
    c.mask_prob = 0.15
    # Logits (the 49409-wide projection, most of a step's cost) are computed at the first N positions
    # only: exact while every caption has at most N tokens with BOS/EOS, and a longer one is an error.
    # 77: every position, as the authors.
    c.max_caption_tokens = 77
    c.masked_weight = 5.0  # the authors' mlm_weight: masked positions weigh 5, other non-padding ones 1
    # Authors' quirk: the weighted sum is divided by B×77, padding included; "non_padding" divides by
    # the non-padding count instead.
    c.loss_normalization = "all_positions"
    # The [MASK] row starts as a random row rescaled to this L1 norm; 0: the average L1 norm of the
    # loaded token table, as the authors' pretraining computes it. Their code also hard-codes
    # avg_norm = 8.525, SD 1.5's value (8.5251): give 8.525 to use the number instead.
    c.mask_init_norm = 0.0
    c.batch_size = 150  # per device in the authors' run, on 2 GPUs: 300 captions per step in all
    c.max_steps = 100_000  # the released checkpoint is step 100000
    c.learning_rate = 1e-4  # constant, no warm-up
    c.optimizer = ml_collections.ConfigDict({"b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 0.0})
    c.seed = 7776
    c.log_every = 100
    c.checkpoint = ml_collections.ConfigDict({"every": 5000, "keep": 3})  # steps between saves; the newest K kept
    c.heldout_size = 64  # synthetic captions scored before and after training
    # The ContextNetV3 architecture; its width is the text encoder's and its vocabulary the text
    # encoder's plus [MASK].
    c.contextualizer = ml_collections.ConfigDict(
        {"num_blocks": 4, "num_heads": 4, "ffn_size": 3072, "ffn_residual": False})

    options = config_lib.parse_options(options, allowed=("tiny", "world"))
    if options == {"tiny", "world"}:
        raise ValueError("configs/contextualizer.py: choose one of the options 'tiny' and 'world'")
    if "world" in options:
        c.synthetic_data = str(world_captions.DATA_DIR)
        c.batch_size = 32
        c.max_steps = 1200
        c.log_every = 50
        c.checkpoint.every = 400
        c.heldout_size = 64
        # World captions framed by a TI template: at most 33 tokens in 5,000 drawn. The projection onto
        # the 49,409-word vocabulary at these positions is most of a step's cost.
        c.max_caption_tokens = 40
        c.contextualizer.ffn_size = 128
        c.learning_rate = 1e-3
    if "tiny" in options:
        c.pretrained = ""
        c.batch_size = 32
        c.max_steps = 300
        c.log_every = 10
        c.checkpoint.every = 100
        c.heldout_size = 32
        c.max_caption_tokens = 32  # synthetic captions: 9.5 tokens on average, 17 the longest of 20K drawn
        c.contextualizer.ffn_size = 128  # 4 × the tiny text encoder's width of 32
        # 1e-4 barely moves a freshly initialised network in a few hundred steps.
        c.learning_rate = 1e-3
    return c
