"""The GRPO controller: one process that encodes the algorithm and drives the worker groups.

`GRPOController.step` reads as the algorithm:

    generate  -> the rollout group samples group_size episodes per prompt (engine at weight version v)
    score     -> rewards of each finished episode (functions, reward models, environment rewards)
    advantage -> group-normalised; groups whose rewards are all equal are dropped (no signal)
    logprobs  -> the policy's own log-probs of the sampled tokens (the "old" policy; and the check
                 against the engine's), the reference's when the KL term is on
    update    -> iterations_per_batch x mini_batches optimizer steps of the policy's SPMD group
    sync      -> the policy's weights go to every rollout engine as version v + 1

Each stage is timed; the controller logs one metrics row per step. The groups are local objects or
Ray actors (posttrain/rl/groups.py): the controller cannot tell, which is what makes `rl.local: true`
the debugging path of the distributed one.
"""

from __future__ import annotations

import math
import time

import torch

from posttrain.data.labels import IGNORE
from posttrain.errors import PosttrainError
from posttrain.rl.groups import deal, undeal
from posttrain.rl.grpo import collate_episodes, group_advantages
from posttrain.rl.workers import fill_logprobs


class LogprobMismatchError(PosttrainError):
    pass


def _split(items: list, parts: int) -> list[list]:
    """`parts` contiguous, near-equal slices (some may be empty)."""
    k, r = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + k + (1 if i < r else 0)
        out.append(items[start:end])
        start = end
    return out


class GRPOController:
    def __init__(self, cfg, tokenizer, policy, rollout, reference, reward, prompts):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.policy, self.rollout, self.reference, self.reward = policy, rollout, reference, reward
        self.prompts = prompts
        self.version = 0
        self.row_len = cfg.data.max_tokens_per_pack
        self.checked = False  # the setup check runs on the first batch, before any update
        self.tokens_generated = 0

    def resume(self, opt_steps_per_step: int) -> int:
        """Put the policy (weights, optimizer, schedule, RNG), the prompt stream's position and the
        weight version back from the latest checkpoint; returns the GRPO step to continue after (0 when
        there is none)."""
        resumed = self.policy.call("resume")[0]
        if resumed is None:
            return 0
        opt_steps, data_state = resumed
        start = opt_steps // opt_steps_per_step
        self.prompts.load_state_dict(data_state)
        self.version = start
        print(f"[grpo] resumed at step {start}")
        return start

    # ------------------------------------------------------------------------------ stages
    def generate(self, prompts: list, step: int, *, greedy: bool = False) -> list:
        shares = _split(prompts, len(self.rollout))
        seed = None if greedy else self.cfg.seed * 1_000_003 + step
        per_worker = [(share,) for share in shares]
        results = self.rollout.call_each(
            "generate", per_worker, seed=seed, version=self.version, greedy=greedy
        )
        return [ep for part in results for ep in part]

    def sync_weights(self) -> float:
        t0 = time.perf_counter()
        self.version += 1
        state = next(sd for sd in self.policy.call("state_dict") if sd is not None)
        self.rollout.call("load_weights", self.rollout.put(state), self.version)
        return time.perf_counter() - t0

    def _logprobs(self, group, batches: list[dict]) -> list:
        shares = deal(batches, len(group), self.tokenizer.pad_id, self.row_len)
        return undeal(group.call_each("logprobs", [(s,) for s in shares]), len(batches))

    # ------------------------------------------------------------------------------ one step
    def step(self, step: int) -> dict:
        r = self.cfg.rl
        timing = {}
        t = time.perf_counter()
        prompts = self.prompts.next(r.prompts_per_step, step)
        results = self.generate(prompts, step)
        timing["time/generate_s"] = time.perf_counter() - t
        gen_tokens = sum(ep.episode.num_policy_tokens for ep in results)
        self.tokens_generated += gen_tokens

        t = time.perf_counter()
        totals, metrics = self.reward.call("score", [res.context for res in results])[0]
        rewards = torch.tensor([tot + res.env_reward for tot, res in zip(totals, results)])
        timing["time/reward_s"] = time.perf_counter() - t

        advantages, std_zero = group_advantages(rewards, r.group_size, scale=r.advantage_scale)
        keep = [i for i in range(len(results)) if not (r.drop_equal_reward_groups and bool(std_zero[i]))]
        metrics |= self._rollout_metrics(results, rewards, std_zero)
        metrics["tokens_per_s/generate"] = gen_tokens / max(timing["time/generate_s"], 1e-9)
        if not keep:  # every group had equal rewards: nothing to learn from this batch
            metrics |= timing | {"skipped_update": 1, "weight_version": self.version}
            return metrics

        episodes = []
        for i in keep:
            ep = results[i].episode
            ep.fields["advantages"] = [float(advantages[i])] * len(ep.token_ids)
            episodes.append(ep)
        batches = collate_episodes(
            episodes,
            self.tokenizer.pad_id,
            self.row_len,
            aggregation=r.loss_aggregation,
            max_new_tokens=r.max_new_tokens,
            rows_per_batch=self.cfg.training.micro_batch_size_per_device,
        )

        t = time.perf_counter()
        old = self._logprobs(self.policy, batches)
        for b, (lp, _) in zip(batches, old):
            fill_logprobs(b, "old_logprobs", lp)
        metrics |= self._mismatch(batches, old)
        timing["time/old_logprobs_s"] = time.perf_counter() - t
        if self.reference is not None:
            t = time.perf_counter()
            for b, lp in zip(batches, self._logprobs(self.reference, batches)):
                fill_logprobs(b, "ref_logprobs", lp)
            timing["time/reference_s"] = time.perf_counter() - t

        t = time.perf_counter()
        update = {}
        for _ in range(r.iterations_per_batch):
            for mini in _split(batches, r.mini_batches):
                if not mini:
                    continue
                shares = deal(mini, len(self.policy), self.tokenizer.pad_id, self.row_len)
                update = self.policy.call_each("train_step", [(s,) for s in shares])[0]
        timing["time/update_s"] = time.perf_counter() - t
        timing["time/sync_s"] = self.sync_weights()
        metrics |= {k: v for k, v in update.items() if k not in ("tokens_per_s", "step_time_s")}
        metrics["tokens_per_s/update"] = update.get("tokens_per_s", 0.0)
        metrics["weight_version"] = self.version
        return metrics | timing

    # ------------------------------------------------------------------------------ telemetry
    def _rollout_metrics(self, results, rewards: torch.Tensor, std_zero: torch.Tensor) -> dict:
        r = self.cfg.rl
        lengths = torch.tensor([float(res.episode.num_policy_tokens) for res in results])
        grouped = rewards.view(-1, r.group_size)
        out = {
            "reward/mean": float(rewards.mean()),
            "reward/std": float(rewards.std()) if len(rewards) > 1 else 0.0,
            "response_length/mean": float(lengths.mean()),
            "response_length/max": float(lengths.max()),
            "truncated_fraction": sum(res.context.finish_reason == "length" for res in results)
            / len(results),
            "equal_reward_groups": float(std_zero.view(-1, r.group_size)[:, 0].float().mean()),
            "turns/mean": sum(res.turns for res in results) / len(results),
        }
        if any(s.kind == "exact_answer" for s in r.rewards) or r.environment == "retry":
            from posttrain.rl.rewards import exact_answer

            correct = torch.tensor([exact_answer(res.context) for res in results]).view(-1, r.group_size)
            out["accuracy"] = float(correct.mean())
            out[f"pass@{r.group_size}"] = float((correct.max(dim=1).values > 0).float().mean())
        out["reward/group_max_mean"] = float(grouped.max(dim=1).values.mean())
        return out

    def _mismatch(self, batches: list[dict], old: list) -> dict:
        """Trainer vs engine log-probs of the same sampled tokens, and entropy; the setup check."""
        diffs, ents, ratios = [], [], []
        for b, (lp, ent) in zip(batches, old):
            keep = b["targets"] != IGNORE
            d = lp - b["rollout_logprobs"][keep]
            diffs.append(d)
            ents.append(ent)
            if self.cfg.rl.is_cap is not None:
                ratios.append(torch.exp(d))
        diff = torch.cat(diffs)
        out = {
            "mismatch/mean_abs_logprob_diff": float(diff.abs().mean()),
            "mismatch/max_abs_logprob_diff": float(diff.abs().max()),
            "entropy": float(torch.cat(ents).mean()),
        }
        if ratios:
            ratio = torch.cat(ratios)
            out["is_ratio/mean"] = float(ratio.mean())
            out["is_ratio/max"] = float(ratio.max())
            out["is_ratio/truncated_fraction"] = float((ratio > self.cfg.rl.is_cap).float().mean())
        if not self.checked:
            self.checked = True
            limit = self.cfg.rl.logprob_check_max_abs_diff
            worst = out["mismatch/max_abs_logprob_diff"]
            print(
                f"[grpo] setup check: max |trainer - engine| logprob = {worst:.2e} over {diff.numel()} "
                f"sampled tokens (mean {out['mismatch/mean_abs_logprob_diff']:.2e}; limit {limit})",
                flush=True,
            )
            if not math.isfinite(worst) or worst > limit:
                raise LogprobMismatchError(
                    f"setup check failed: the trainer's and the rollout engine's log-probs of the same sampled "
                    f"tokens differ by up to {worst:.3g} (rl.logprob_check_max_abs_diff={limit}). Check that "
                    "rl.temperature is what the engine samples with, that both use the same weights and "
                    "model.dtype, or raise the limit for a lower-precision engine"
                )
        return out

    # ------------------------------------------------------------------------------ evaluation
    def evaluate(self, eval_prompts: list) -> dict:
        """Greedy exact-match accuracy and the rl.rewards (`eval_reward/...`) on held-out prompts, with
        the current engine weights."""
        from posttrain.rl.rewards import exact_answer

        if not eval_prompts:
            return {}
        t = time.perf_counter()
        results = self.generate(eval_prompts, 0, greedy=True)
        hits: dict[str, list[float]] = {}
        for prompt, res in zip(eval_prompts, results):
            task = str(prompt.row.metadata.get("task", "all"))
            hits.setdefault(task, []).append(exact_answer(res.context))
        every = [h for v in hits.values() for h in v]
        totals, reward_metrics = self.reward.call("score", [res.context for res in results])[0]
        out = {"eval_accuracy": sum(every) / len(every), "eval_time_s": time.perf_counter() - t}
        out["eval_reward/mean"] = sum(totals) / len(totals)
        out |= {f"eval_{k}": v for k, v in reward_metrics.items()}
        out |= {f"eval_accuracy/{k}": sum(v) / len(v) for k, v in sorted(hits.items())}
        return out
