"""posttrain: post-training for large language models.

Kept deliberately light: importing the package pulls in nothing heavy (no torch, ray, vllm,
mlflow or tensorboard). Submodules import what they use.
"""

__version__ = "0.1.0"
