"""The roles of on-policy RL, each a plain class that runs the same in the controller's process
(`rl.local: true`) or as Ray actors (posttrain/rl/groups.py):

  PolicyWorker     one SPMD rank of the training group: the model (FSDP/TP from `parallelism`), the
                   shared Trainer (optimizer, schedule, clipping, checkpoints) and the GRPO loss
  RolloutWorker    a rollout engine (ours, or vLLM) plus the environment; runs whole episodes
  ReferenceWorker  the frozen starting model; log-probabilities for the KL term
  RewardWorker     the `rl.rewards` (functions, and reward models that need weights)

Micro-batches cross worker boundaries as dicts of CPU tensors, episodes as plain dataclasses, weights
as a state dict of CPU tensors: all picklable, so Ray moves them through its object store.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from posttrain.config import JobConfig
from posttrain.data.labels import IGNORE
from posttrain.errors import ConfigError
from posttrain.rl.grpo import (
    GRPOLossConfig,
    constraint_mask,
    grpo_loss_fn,
    loss_units_for,
    token_entropy,
    token_logprobs,
)


def _tokenizer(cfg: JobConfig):
    from posttrain.train.setup import build_tokenizer

    return build_tokenizer(cfg.tokenizer)


def loss_config(cfg: JobConfig) -> GRPOLossConfig:
    r = cfg.rl
    return GRPOLossConfig(
        clip_low=r.clip_low,
        clip_high=r.clip_high,
        kl_coef=r.kl_coef,
        kl_estimator=r.kl_estimator,
        kl_bias_correction=r.kl_bias_correction,
        temperature=r.temperature,
        is_cap=r.is_cap,
        chunk_size=cfg.training.loss_chunk_size_tokens,
    )


def build_constraint(spec: str | None, tokenizer, semantic_ids=None):
    """rl.constraint -> (TokenConstraint, completion decoder or None), or (None, None) without one.

    semantic_ids: the event model's item-code trie, whose decoder writes a completion as the item ids
    it names; `semantic_ids(tokenizer)` builds both. The event-data hook (posttrain/events/rl.py) hands
    it to the workers, so RL knows nothing of events. path/to/file.py:make_constraint: make(tokenizer)."""
    if spec is None:
        return None, None
    if spec == "semantic_ids":
        if semantic_ids is None:
            raise ConfigError(
                "rl.constraint=semantic_ids is an event model's item-code trie: it needs event data "
                "(data.train of format events, docs/events.md)"
            )
        return semantic_ids(tokenizer)
    from posttrain.rl.rewards import load_function

    return load_function(spec, "rl.constraint")(tokenizer), None


def rl_precision(cfg: JobConfig, device: torch.device):
    """The compute precision every RL role shares (trainer, old/reference log-probs, rollout engine):
    bf16 autocast over fp32 weights when parallelism.mixed_precision=bfloat16, so the setup check
    compares trainer and engine log-probs computed in the same precision."""
    from posttrain.parallel.parallelize import autocast_dtype
    from posttrain.parallel.world import World

    dtype = autocast_dtype(cfg.model.dtype, cfg.parallelism, World())
    return torch.autocast(device.type, dtype, enabled=dtype is not None)


@torch.no_grad()
def batch_logprobs(model, batch: dict, cfg: JobConfig, tokenizer, *, entropy: bool, constraint=None):
    """(log-probs, entropies or None) at the batch's loss positions, row-major (as the loss reads them),
    at rl.temperature over the tokenizer's real vocabulary (the allowed tokens, with a constraint), in
    the RL compute precision (`rl_precision`)."""
    device = next(model.parameters()).device
    with rl_precision(cfg, device):
        return _batch_logprobs(model, batch, cfg, tokenizer, entropy=entropy, constraint=constraint)


def _batch_logprobs(model, batch: dict, cfg: JobConfig, tokenizer, *, entropy: bool, constraint=None):
    device = next(model.parameters()).device
    temperature, num_real_vocab = cfg.rl.temperature, tokenizer.vocab_size
    allowed = None
    if constraint is not None:
        allowed = constraint_mask(batch["targets"], batch["episode_index"], constraint, num_real_vocab)

    def head(h, w):
        t = batch["targets"].to(device)
        opts = {"temperature": temperature, "num_real_vocab": num_real_vocab, "allowed_NV": allowed}
        lp = token_logprobs(h, w, t, **opts)
        ent = token_entropy(h, w, t, **opts) if entropy else None
        return lp, ent

    was_training = model.training
    model.eval()
    try:
        lp, ent = model(
            batch["input_ids"].to(device),
            batch["position_ids"].to(device),
            batch["doc_ids"].to(device),
            head_fn=head,
        )
    finally:
        model.train(was_training)
    return lp.float().cpu(), None if ent is None else ent.float().cpu()


class _DataState:
    """What Trainer.save/resume expect of a loader, for state the controller owns (the prompt stream)."""

    state_is_per_rank = False

    def __init__(self, state: dict | None = None):
        self.state = state

    def state_dict(self) -> dict | None:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = state


class PolicyWorker:
    """One rank of the policy's SPMD group (rank 0 of 1 in a local run)."""

    def __init__(
        self, cfg: JobConfig, total_steps: int, env: dict[str, str] | None = None, semantic_ids=None
    ):
        if env:  # a Ray actor joins the group through torchrun's variables
            os.environ.update(env)
        from posttrain.config import dump_job
        from posttrain.metrics.mfu import peak_flops
        from posttrain.models.build import flops_fn_for, head_counts
        from posttrain.parallel.build import build_model_for
        from posttrain.parallel.parallelize import autocast_dtype
        from posttrain.parallel.world import init_world
        from posttrain.train.setup import seed_everything
        from posttrain.train.trainer import Trainer

        self.cfg = cfg
        self.world = init_world(cfg.parallelism, device=cfg.training.device, **head_counts(cfg.model))
        seed_everything(cfg.seed)
        self.tokenizer = _tokenizer(cfg)
        self.built = build_model_for(
            cfg.model, self.tokenizer, cfg.seed, world=self.world, parallelism=cfg.parallelism
        )
        self.model = self.built.module
        self.constraint, _ = build_constraint(cfg.rl.constraint, self.tokenizer, semantic_ids)
        device = next(self.model.parameters()).device
        self.trainer = Trainer(
            self.model,
            grpo_loss_fn(loss_config(cfg), self.tokenizer.vocab_size, self.constraint),
            training=cfg.training,
            optim=cfg.optim,
            schedule=cfg.schedule,
            total_steps=total_steps,
            grad_accum_steps=1,  # the controller hands each step all of its micro-batches
            output_dir=Path(cfg.output_dir),
            config_yaml=dump_job(cfg),
            flops_fn=flops_fn_for(self.built),
            peak_flops_per_s=peak_flops(cfg.metrics.peak_flops_per_s, device),
            progress="quiet",
            loss_units=loss_units_for(cfg.rl.loss_aggregation),
            world=self.world,
            autocast_dtype=autocast_dtype(cfg.model.dtype, cfg.parallelism, self.world),
        )

    def notes(self) -> list[str]:
        return list(self.built.notes)

    def logprobs(self, batches: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per micro-batch (log-probs, entropies) of the current policy (GRPO's "old" policy)."""
        return [
            batch_logprobs(self.model, b, self.cfg, self.tokenizer, entropy=True, constraint=self.constraint)
            for b in batches
        ]

    def train_step(self, batches: list[dict]) -> dict:
        t0 = time.perf_counter()
        metrics = self.trainer.train_step(batches)
        metrics["time/update_step_s"] = time.perf_counter() - t0
        return metrics

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full CPU weights for the rollout engines (collective under FSDP; rank 0 returns them)."""
        if self.world.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            sd = get_model_state_dict(
                self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
            return sd if self.world.is_main else None
        if self.cfg.rl.engine == "vllm" and self.built.has_lora:  # vLLM takes plain HF weights
            from posttrain.models.lora import merged_state_dict

            return {k: v.detach().to("cpu", copy=True) for k, v in merged_state_dict(self.model).items()}
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def save(self, data_state: dict) -> str:
        return str(self.trainer.save(_DataState(data_state)))

    def resume(self) -> tuple[int, dict | None] | None:
        """(optimizer steps done, the controller's data state) from the latest checkpoint, or None."""
        holder = _DataState()
        if not self.trainer.resume(holder):
            return None
        return self.trainer.state.step, holder.state

    def export(self) -> str | None:
        from posttrain.models.build import export_hf

        out_dir = Path(self.cfg.output_dir) / "hf"
        out = export_hf(self.built, self.tokenizer, out_dir, dtype=self.cfg.training.export_dtype)
        return str(out) if out else None

    def summary(self) -> dict:
        m = self.model
        return {
            "num_params": sum(p.numel() for p in m.parameters()),
            "num_trainable_params": sum(p.numel() for p in m.parameters() if p.requires_grad),
            "tokens_seen": self.trainer.state.tokens_seen,
            "nonfinite_steps": self.trainer.state.nonfinite_steps,
        }

    def close(self) -> None:
        from posttrain.parallel.world import close_world

        close_world(self.world)


def _single_device_model(cfg: JobConfig, tokenizer):
    """The starting weights on one device (an engine's or the reference's own copy)."""
    from posttrain.parallel.build import build_model_for
    from posttrain.parallel.world import use_cuda

    model = build_model_for(cfg.model, tokenizer, cfg.seed).module
    return model.cuda() if use_cuda(cfg.training.device) else model


class RolloutWorker:
    """A rollout engine and the environment: whole episodes, token-in / token-out."""

    def __init__(self, cfg: JobConfig, semantic_ids=None):
        from posttrain.rl.engine import LocalEngine

        self.cfg = cfg
        self.tokenizer = _tokenizer(cfg)
        constraint, self.decode = build_constraint(cfg.rl.constraint, self.tokenizer, semantic_ids)
        if cfg.rl.engine == "vllm":
            from posttrain.rl.vllm_engine import VLLMEngine

            if constraint is not None:
                raise ConfigError("rl.constraint needs rl.engine=local (the vLLM adapter does not apply it)")
            if cfg.model.path is None:
                raise ConfigError(
                    "rl.engine=vllm starts vLLM on model.path (an HF checkpoint directory); set it"
                )
            self.engine = VLLMEngine.from_checkpoint(
                cfg.model.path, num_real_vocab=self.tokenizer.vocab_size, dtype=cfg.model.dtype, seed=cfg.seed
            )
        else:
            model = _single_device_model(cfg, self.tokenizer)
            for p in model.parameters():
                p.requires_grad_(False)
            self.engine = LocalEngine(
                model,
                pad_id=self.tokenizer.pad_id,
                num_real_vocab=self.tokenizer.vocab_size,
                constraint=constraint,
            )
        self.make_env = None
        if cfg.rl.environment is not None:
            self.make_env = environment_factory(cfg.rl.environment, self.tokenizer, cfg.rl.max_turns)

    def version(self) -> int:
        return self.engine.version

    def load_weights(self, state_dict: dict, version: int) -> None:
        self.engine.load_weights(state_dict, version)

    def generate(
        self, prompts: list, *, seed: int | None, version: int, greedy: bool = False, group_size=None
    ):
        """Episodes (posttrain.rl.env.EpisodeResult) for `prompts` (posttrain.rl.prompts.Prompt)."""
        from posttrain.rl.env import run_episodes
        from posttrain.rl.types import SamplingParams

        r = self.cfg.rl
        stops = (self.tokenizer.end_of_turn_id, self.tokenizer.eos_id)
        params = SamplingParams(
            max_new_tokens=r.eval_max_new_tokens if greedy else r.max_new_tokens,
            temperature=0.0 if greedy else r.temperature,
            top_p=1.0 if greedy else r.top_p,
            top_k=0 if greedy else r.top_k,
            stop_ids=stops,
            n=1 if greedy else (group_size or r.group_size),
            seed=seed,
        )
        device = self.engine.model.output_weight().device if hasattr(self.engine, "model") else None
        with rl_precision(self.cfg, device or torch.device("cpu")):
            return run_episodes(
                self.engine,
                self.tokenizer,
                [p.row for p in prompts],
                [p.ids for p in prompts],
                params,
                group_size=params.n,
                version=version,
                make_env=None if greedy else self.make_env,
                max_turns=r.max_turns,
                max_episode_tokens=self.cfg.data.max_tokens_per_pack,
                decode=self.decode,
            )


def environment_factory(spec: str, tokenizer, max_turns: int):
    """rl.environment -> a zero-argument factory of environments."""
    from posttrain.rl.env import RetryEnv
    from posttrain.rl.rewards import load_function

    if spec == "retry":
        return lambda: RetryEnv(tokenizer, max_turns=max_turns)
    make = load_function(spec, "rl.environment")
    return lambda: make(tokenizer)


class ReferenceWorker:
    """The frozen starting policy, for the KL term."""

    def __init__(self, cfg: JobConfig, semantic_ids=None):
        self.cfg = cfg
        self.tokenizer = _tokenizer(cfg)
        self.model = _single_device_model(cfg, self.tokenizer)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.constraint, _ = build_constraint(cfg.rl.constraint, self.tokenizer, semantic_ids)

    def logprobs(self, batches: list[dict]) -> list[torch.Tensor]:
        return [
            batch_logprobs(
                self.model, b, self.cfg, self.tokenizer, entropy=False, constraint=self.constraint
            )[0]
            for b in batches
        ]


class RewardWorker:
    def __init__(self, cfg: JobConfig):
        from posttrain.rl.rewards import build_rewards

        self.rewards = build_rewards(cfg.rl.rewards)

    def score(self, contexts: list) -> tuple[list[float], dict]:
        from posttrain.rl.rewards import score_episodes

        return score_episodes(self.rewards, contexts)


def fill_logprobs(batch: dict, key: str, values: torch.Tensor) -> None:
    """Write per-loss-position values (row-major, as batch_logprobs returns them) into batch[key] [B, T]."""
    keep = batch["targets"] != IGNORE
    out = torch.zeros(batch["targets"].shape, dtype=torch.float32)
    out[keep] = values
    batch[key] = out
