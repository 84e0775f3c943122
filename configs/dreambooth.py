r"""DreamBooth (+ MLM): the UNet, the whole text encoder and the new token train; prior preservation.

PAPER.md §3: 1 instance + 1 class image per step, lr 1e-6 (not scaled), prior weight 1, grad-clip 1,
the concept token initialised from "sks". MLM gradients reach the text encoder only. Option
``no_text_encoder`` (after the file name) trains the UNet and the token only.

    python -m mlmjax.train --config configs/dreambooth.py --workdir /tmp/db
    python -m mlmjax.train --config configs/dreambooth.py:no_text_encoder --workdir /tmp/db-unet
"""

from mlmjax import config as config_lib


def get_config(options: str = ""):
    c = config_lib.base_config()
    c.method = "dreambooth"
    c.seed = 7777
    c.max_steps = 1001  # the authors evaluate steps 500, 750 and 1000
    c.batch_size = 1
    c.learning_rate = 1e-6
    c.concept.init_word = "sks"
    c.prior.weight = 1.0
    c.prior.num_images = 100
    c.optimizer.grad_clip = 1.0
    c.mlm.weight = 2.5e-4  # from the authors' sweep {1e-4, 2e-4, 2.5e-4, 5e-4, 1e-3}; their final is unknown
    c.mlm.batch_size = 25
    options = config_lib.parse_options(options, allowed=("no_text_encoder",))
    c.trainable = [(config_lib.CONCEPT, "train"), (config_lib.UNET, "train")]
    if "no_text_encoder" not in options:
        c.trainable.append((config_lib.TEXT_ENCODER, "train"))
    c.trainable.append((r".*", "freeze"))
    return c
