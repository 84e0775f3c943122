r"""Contextualizer pretraining: masked language modelling on CLIP text features (PAPER.md §1.2-1.3).

    python -m mlmjax.train --config configs/contextualizer.py:tiny --workdir /tmp/ctx-tiny
    python -m mlmjax.train --config configs/contextualizer.py --workdir /data/ctx \
        --config.pretrained=/data/sd15 --config.captions=/data/coco_caption_raw.txt

The result, ``<workdir>/contextualizer``, is what a customization run takes as
``--config.mlm.contextualizer``. Option ``tiny`` (after the file name) shrinks the run for a CPU: the
embedded tiny model, batch 32, 300 steps at lr 1e-3.
"""

import ml_collections

from mlmjax import config as config_lib


def get_config(options: str = "") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "contextualizer"
    c.pretrained = ""  # a diffusers-layout folder (only text_encoder/ and tokenizer/ are read); empty: the embedded tiny model
    c.captions = ""  # one caption a line (the authors': COCO Karpathy, coco_caption_raw.txt); empty: synthetic only
    c.synthetic_ratio = 0.3  # the authors' synth_prob; ignored (1.0) when captions is empty
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

    options = config_lib.parse_options(options, allowed=("tiny",))
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
