"""mlmjax: MLM-regularised customization of Stable Diffusion in JAX/Flax."""

from setuptools import find_packages, setup

# Concept photos kept as a tensorflow-datasets collection (mlmjax.tfds_concepts): array_record files,
# read and written without TensorFlow.
TFDS = ["tensorflow-datasets>=4.9.10", "array_record>=0.8.6", "importlib_resources"]

setup(
    name="mlmjax",
    version="0.1.0",
    description="Learning to Customize Text-to-Image Diffusion In Diverse Context, in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    # The vendored CLIP vocabulary lives in third_party/ with its licence and is installed as
    # package data of mlmjax._clip_bpe.
    packages=find_packages(include=["mlmjax", "mlmjax.*"]) + ["mlmjax._clip_bpe"],
    package_dir={"mlmjax._clip_bpe": "third_party/clip_bpe"},
    package_data={"mlmjax._clip_bpe": ["*.gz", "LICENSE"],
                  "mlmjax.prompts": ["data/*.txt", "data/*.md", "data/*/*.txt"],
                  "mlmjax.world": ["data/*.txt", "data/*.md", "data/*/*.txt", "assets/evaluator/*"],
                  "mlmjax": ["assets/*/*", "assets/*/*/*"]},
    # Lower bounds, not pins: accelerator hosts on Python >= 3.12 run newer jax/flax.
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "ml_collections>=1.1.0",
        "numpy",
        "safetensors>=0.4",
        "pillow",
        "grain>=0.2.18",
        "tqdm",
        # TensorBoard event files without TensorFlow, and loss_curve.png.
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        # Tokenizer and config classes only: CLIPTokenizer needs no torch.
        "transformers>=5,<6",
    ],
    extras_require={
        "test": [
            # Exactly this version: it is a CPU wheel here; an unpinned torch pulls a CUDA build.
            "torch==2.13.0",
            "diffusers>=0.40",
            "transformers>=5,<6",
            "pytest",
            "pytest-xdist",
            *TFDS,  # the tfds: image sources are tested too
        ],
        "tfds": TFDS,
        # python -m mlmjax.bench's PyTorch reference step (mlmjax itself never imports torch).
        "bench": ["torch==2.13.0", "diffusers>=0.40", "transformers>=5,<6"],
    },
)
