r"""Textual Inversion (+ MLM): one new token embedding trains; nothing else does (PAPER.md §3).

    python -m mlmjax.train --config configs/ti.py --workdir /tmp/ti
    python -m mlmjax.train --config configs/ti.py --workdir /tmp/ti-plain --config.mlm.weight=0
    python -m mlmjax.train --config configs/ti.py --workdir /tmp/dog6 --config.pretrained=/data/sd15 \
        --config.concept.images=/data/dog6 --config.concept.token='<dog6>' --config.concept.class_noun=dog \
        --config.concept.family=pet
"""

from mlmjax import config as config_lib


def get_config():
    c = config_lib.base_config()
    c.method = "ti"
    c.seed = 7777
    c.max_steps = 3001  # the authors evaluate steps 2000 and 3000
    c.batch_size = 4
    c.learning_rate = 2e-3  # 5e-4 × batch 4, the authors' scale_lr
    c.prior.weight = 0.0
    c.mlm.weight = 1e-5  # the value of all the authors' TI ablations (their sweep: 1e-5, 5e-5)
    c.mlm.batch_size = 25
    c.trainable = [(config_lib.CONCEPT, "train"), (r".*", "freeze")]
    return c
