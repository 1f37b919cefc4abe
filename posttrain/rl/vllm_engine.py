"""The RolloutEngine protocol on vLLM (`vllm.LLM`), for GPU machines where `vllm` is importable.

vllm is imported only inside the functions that need it: this module imports anywhere, and the pure parts
(our state dict -> vLLM weights, our sampling params -> vLLM's, vLLM outputs -> Rollouts) are unit-tested
without it. Token ids in, token ids out: prompts go in as `{"prompt_token_ids": ...}`, nothing is decoded.

How it maps onto vLLM (checked against vLLM's V1 sources and TRL 1.16's colocated-vLLM path,
trl/generation/vllm_generation.py):
  * Log-probs: the LLM is built with `logprobs_mode="processed_logprobs"` and each request asks for
    `logprobs=0` (the sampled token's log-prob only). vLLM computes processed log-probs after temperature
    and AFTER top-k/top-p (vllm/v1/sample/ops/topk_topp_sampler.py, TopKTopPSampler.forward_native), so with
    top-k/top-p off they are log_softmax(logits / T), our contract; with truncation on they would be the
    truncated distribution's, so this engine refuses top_k / top_p (use LocalEngine for those).
    Greedy requests (temperature 0) get log_softmax(logits), as ours.
  * Sampling: `n` samples of a prompt are n requests (prefix caching shares the prompt's KV), each with its
    own seed (seed + row) when a seed is set, so samples of one prompt differ and runs repeat.
    `ignore_eos=True`: only our stop ids end a sample, and vLLM keeps the stop token in `token_ids`
    (vllm/v1/core/sched/utils.py, check_stop). Vocabulary rows past num_real_vocab are excluded with
    `allowed_token_ids`, applied before the log-probs are computed.
  * Weights: our names -> HF names with the family's key map (the one the HF export uses), padding rows
    trimmed to the checkpoint's vocabulary, then `LLM.apply_model(lambda m: m.load_weights(items))`
    (vllm/entrypoints/llm.py, LLM.apply_model; TRL calls the same `model.load_weights` through
    `llm.llm_engine.model_executor.driver_worker.model_runner.model`) and `LLM.reset_prefix_cache()`, since
    cached prefixes hold keys computed with the old weights. `from_checkpoint` sets
    VLLM_ENABLE_V1_MULTIPROCESSING=0 so the engine core runs in this process and apply_model hands the
    tensors over without serialising them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from posttrain.errors import ModelError
from posttrain.models.vocab import trimmed_state_dict
from posttrain.rl.engine import check_prompts, check_version
from posttrain.rl.types import Rollout, SamplingParams


def vllm_weights(
    state_dict: Mapping[str, torch.Tensor], config: Any, vocab_size: int
) -> dict[str, torch.Tensor]:
    """Our state dict (policy.state_dict(), LoRA merged) -> {HF name: tensor} as vLLM's load_weights reads it.

    Embedding / output rows are cut to `vocab_size` (the checkpoint vLLM loaded); score heads are dropped."""
    from posttrain.models.hf_io import FAMILIES

    if any(".lora_a." in k or ".lora_b." in k for k in state_dict):
        raise ModelError(
            "VLLMEngine.load_weights: the state dict has LoRA adapter weights; pass lora.merged_state_dict(policy)"
        )
    plain = {
        name: tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # FSDP2 DTensor
        for name, tensor in state_dict.items()
        if not name.startswith("heads.")
    }
    model_type = config.to_hf_dict()["model_type"]
    to_hf = FAMILIES[model_type][3]
    return to_hf(trimmed_state_dict(plain, vocab_size), config)


def vllm_sampling_kwargs(
    params: SamplingParams, row: int, *, num_real_vocab: int, vocab_size: int
) -> dict[str, Any]:
    """Keyword arguments of `vllm.SamplingParams` for one sample (row `row` of this generate call)."""
    if params.top_k != 0 or params.top_p != 1.0:
        raise ValueError(
            f"VLLMEngine: top_k={params.top_k}, top_p={params.top_p}: vLLM reports log-probs after top-k/top-p "
            "truncation, not the untruncated ones the trainer recomputes; use top_k=0, top_p=1.0 (or LocalEngine)"
        )
    kwargs: dict[str, Any] = dict(
        n=1,
        max_tokens=params.max_new_tokens,
        temperature=params.temperature,
        stop_token_ids=list(params.stop_ids),
        ignore_eos=True,
        logprobs=0,
        detokenize=False,
        seed=None if params.seed is None else params.seed + row,
    )
    if num_real_vocab < vocab_size:
        kwargs["allowed_token_ids"] = list(range(num_real_vocab))
    return kwargs


def rollouts_from_outputs(prompts: Sequence[Sequence[int]], outputs: Sequence[Any]) -> list[Rollout]:
    """vLLM RequestOutputs (one completion each, in request order) -> Rollouts."""
    rollouts = []
    for prompt, output in zip(prompts, outputs, strict=True):
        completion = output.outputs[0]
        token_ids = list(completion.token_ids)
        if completion.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM ended a sample with finish_reason={completion.finish_reason!r}")
        if completion.logprobs is None or len(completion.logprobs) != len(token_ids):
            raise RuntimeError(
                "vLLM returned no log-prob for some sampled tokens (was logprobs=0 requested?)"
            )
        logprobs = [float(step[token].logprob) for step, token in zip(completion.logprobs, token_ids)]
        rollouts.append(Rollout(list(prompt), token_ids, logprobs, completion.finish_reason))
    return rollouts


class VLLMEngine:
    """A RolloutEngine on a `vllm.LLM` (built by `from_checkpoint`, or passed in already built with
    logprobs_mode="processed_logprobs" and an in-process engine core)."""

    def __init__(self, llm: Any, config: Any, *, num_real_vocab: int, vocab_size: int) -> None:
        """config: our architecture config of the loaded checkpoint (names the HF key map); vocab_size: the
        checkpoint's vocabulary rows; num_real_vocab: the tokenizer's ids (rows past it are never sampled)."""
        if not 0 < num_real_vocab <= vocab_size:
            raise ValueError(f"num_real_vocab={num_real_vocab} must be in 1..vocab_size={vocab_size}")
        self.llm = llm
        self.config = config
        self.num_real_vocab = num_real_vocab
        self.vocab_size = vocab_size
        self.version = 0

    @classmethod
    def from_checkpoint(
        cls,
        hf_dir: str | Path,
        *,
        num_real_vocab: int,
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = 0.5,
        seed: int = 0,
        **llm_kwargs: Any,
    ) -> VLLMEngine:
        """Start vLLM on an HF checkpoint directory (e.g. the policy's export); llm_kwargs go to vllm.LLM."""
        from posttrain.models.hf_io import read_checkpoint_config

        config, _, _ = read_checkpoint_config(Path(hf_dir))
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process core: see the module doc
        from vllm import LLM

        llm = LLM(
            model=str(hf_dir),
            dtype=dtype,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=True,
            skip_tokenizer_init=True,  # token ids in and out
            **llm_kwargs,
        )
        return cls(llm, config, num_real_vocab=num_real_vocab, vocab_size=config.vocab_size)

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        items = list(vllm_weights(state_dict, self.config, self.vocab_size).items())
        self.llm.apply_model(lambda model: model.load_weights(items))
        self.llm.reset_prefix_cache()
        self.version = version

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        expected_version: int | None = None,
    ) -> list[Rollout]:
        """len(prompts) * n rollouts, prompt-major; see RolloutEngine.generate."""
        from vllm import SamplingParams as VLLMSamplingParams

        check_version(self, expected_version)
        check_prompts(prompts, self.num_real_vocab)
        rows = [list(prompts[i]) for i in range(len(prompts)) for _ in range(params.n)]
        sampling = [
            VLLMSamplingParams(
                **vllm_sampling_kwargs(
                    params, r, num_real_vocab=self.num_real_vocab, vocab_size=self.vocab_size
                )
            )
            for r in range(len(rows))
        ]
        requests = [{"prompt_token_ids": ids} for ids in rows]
        outputs = self.llm.generate(requests, sampling_params=sampling, use_tqdm=False)
        return rollouts_from_outputs(rows, outputs)
