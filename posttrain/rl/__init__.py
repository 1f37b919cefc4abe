"""On-policy RL: rollout engines, the GRPO algorithm and its controller.

Kept import-light like the package root: submodules import torch (and ray / vllm where used) themselves.
"""
