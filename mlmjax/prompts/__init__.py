"""Text-only prompts: the context-rich MLM prompt set, synthetic pretraining captions, diffusion-loss
templates and evaluation prompts. Pure Python + numpy; every draw takes a `np.random.Generator`."""

from mlmjax.prompts.prompt_set import (
    CLASS_PROMPT,
    FAMILIES,
    UNPREFIXED_TYPES,
    MlmPrompt,
    PromptSet,
    class_prompt,
    diffusion_prompt,
    eval_prompts,
    ti_templates,
)
from mlmjax.prompts.synthetic import caption_stream, read_caption_file, synthetic_captions, synthetic_set
from mlmjax.prompts.templates import DATA_DIR, SLOT, TemplateSet, with_article

__all__ = [
    "CLASS_PROMPT",
    "DATA_DIR",
    "FAMILIES",
    "SLOT",
    "UNPREFIXED_TYPES",
    "MlmPrompt",
    "PromptSet",
    "TemplateSet",
    "caption_stream",
    "class_prompt",
    "diffusion_prompt",
    "eval_prompts",
    "read_caption_file",
    "synthetic_captions",
    "synthetic_set",
    "ti_templates",
    "with_article",
]
