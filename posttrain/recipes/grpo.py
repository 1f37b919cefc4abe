"""GRPO: on-policy RL with group-relative advantages, from a config, in one process or on Ray.

Read `train()` top to bottom: tokenizer -> prompts -> worker groups -> controller -> loop -> export.
The controller (posttrain/rl/controller.py) holds the algorithm; the roles (posttrain/rl/workers.py)
are the same classes whether they run here (`rl.local: true`: the way to debug) or as Ray actors
placed by resource pools (`rl.local: false`, posttrain/rl/groups.py). The policy trains with the
shared Trainer (its optimizer, schedule, clipping, checkpoints), so everything SFT guarantees holds.

`training.max_steps` counts GRPO steps; checkpoints hold the policy, optimizer, schedule, the prompt
stream's position and the step, and `training.resume` continues from the latest one.

On event data (`data.train` of format `events`, `model.path` an event model), the prompts are users'
histories as token ids and the held-out events are the eval prompts (posttrain/events/rl.py); with
`rl.constraint: semantic_ids` every sample is a real item, and the summary adds held-out recall/NDCG
of the constrained beam search before and after (`events_eval`).
"""

from __future__ import annotations

from pathlib import Path

from posttrain.config import JobConfig, dump_job
from posttrain.errors import ConfigError
from posttrain.metrics import runs
from posttrain.metrics.progress import Progress
from posttrain.metrics.trackers import open_trackers
from posttrain.rl.controller import GRPOController
from posttrain.rl.groups import LocalGroup
from posttrain.rl.prompts import PromptStream, load_eval_prompts
from posttrain.rl.workers import PolicyWorker, ReferenceWorker, RewardWorker, RolloutWorker
from posttrain.train.setup import Timer, build_tokenizer, check_formats, write_summary

FORMATS = ("rl_prompt",)


def train(cfg: JobConfig) -> dict:
    """Run the job; returns the summary also written to OUTPUT/summary.json."""
    check_formats(cfg, FORMATS + ("chat", "events"))
    if cfg.training.max_steps is None:
        raise ConfigError("recipe grpo: set training.max_steps (GRPO steps); training.num_epochs is not used")
    if cfg.rl.local and cfg.rl.policy_workers > 1:
        raise ConfigError(
            f"rl.policy_workers={cfg.rl.policy_workers} needs rl.local: false (Ray), or run the local "
            "controller under `posttrain run --nproc N` (not supported yet: use Ray)"
        )
    timer = Timer()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_job(cfg))
    runs.mark_started(out, "grpo", cfg.rl.policy_workers)
    try:
        return _train(cfg, out, timer)
    except BaseException as err:
        runs.mark_ended(out, runs.end_status(err), err)
        raise


def _train(cfg: JobConfig, out: Path, timer: Timer) -> dict:
    r = cfg.rl
    opt_steps_per_step = r.iterations_per_batch * r.mini_batches
    total_opt_steps = cfg.training.max_steps * opt_steps_per_step

    # 1. Tokenizer and prompts (streamed, mixed, resumable), and the held-out prompts. Event logs become
    # prompt files first (users' histories as token ids; held-out events as data.eval).
    tokenizer = build_tokenizer(cfg.tokenizer)
    event_prompts = None
    if any(s.format == "events" for s in cfg.data.train_sources):
        from posttrain.events.rl import prepare_grpo

        event_prompts = prepare_grpo(cfg, tokenizer, out)
        cfg = event_prompts.cfg
    max_prompt = cfg.data.max_tokens_per_pack - r.max_new_tokens * r.max_turns
    prompts = PromptStream(cfg.data, tokenizer, seed=cfg.seed, max_prompt_tokens=max_prompt)
    eval_prompts = load_eval_prompts(cfg.data, tokenizer)

    # 2. Worker groups: policy (SPMD trainer), rollout engines, reference (KL only), rewards.
    need_reference = r.kl_coef != 0.0
    pools = None
    sids = event_prompts.semantic_ids if event_prompts is not None else None  # rl.constraint: semantic_ids
    if r.local:
        policy = LocalGroup([PolicyWorker(cfg, total_opt_steps, semantic_ids=sids)])
        rollout = LocalGroup([RolloutWorker(cfg, sids) for _ in range(r.rollout_workers)])
        reference = LocalGroup([ReferenceWorker(cfg, sids)]) if need_reference else None
        reward = LocalGroup([RewardWorker(cfg)])
    else:
        from posttrain.rl.groups import ray_groups

        policy, rollout, reference, reward, pools = ray_groups(cfg, total_opt_steps, need_reference, sids)
    for note in policy.call("notes")[0]:
        print(f"[model] {note}")

    # 3. The controller; resume puts the policy, optimizer, prompt stream and step back.
    controller = GRPOController(cfg, tokenizer, policy, rollout, reference, reward, prompts)
    start = 0
    if cfg.training.resume:
        resumed = policy.call("resume")[0]
        if resumed is not None:
            opt_steps, data_state = resumed
            start = opt_steps // opt_steps_per_step
            prompts.load_state_dict(data_state)
            controller.version = start
            print(f"[grpo] resumed at step {start}")
    controller.sync_weights()  # engines start from the policy's weights (fresh or resumed)
    trackers = open_trackers(cfg.metrics, out, cfg.model_dump(mode="json"), start if start else None)

    # 4. The loop: one GRPO step per iteration; eval and checkpoints on their cadences.
    progress = Progress(cfg.training.max_steps, "grpo", cfg.metrics.progress, start=start)
    first_eval = controller.evaluate(eval_prompts)
    if first_eval and start == 0:
        trackers.log_eval(0, first_eval)
    metrics, last_eval, first_reward = {}, first_eval, None
    try:
        for step in range(start + 1, cfg.training.max_steps + 1):
            metrics = controller.step(step)
            first_reward = metrics["reward/mean"] if first_reward is None else first_reward
            every = cfg.training.eval_every_steps
            if eval_prompts and every and step % every == 0 and step != cfg.training.max_steps:
                last_eval = controller.evaluate(eval_prompts)
                metrics |= last_eval
            if step % cfg.training.log_every_steps == 0 or step == cfg.training.max_steps:
                trackers.log_metrics(step, metrics)
            progress.update(
                step, reward=round(metrics["reward/mean"], 3), loss=round(metrics.get("loss", 0.0), 4)
            )
            if cfg.training.save_every_steps and step % cfg.training.save_every_steps == 0:
                policy.call("save", prompts.state_dict())
            runs.mark_step(out, step, cfg.training.max_steps)
        if eval_prompts:
            last_eval = controller.evaluate(eval_prompts)
            trackers.log_eval(cfg.training.max_steps, last_eval)

        # 5. Export and summary.
        hf_dir = policy.call("export")[0] if cfg.training.export_hf else None
        if hf_dir and event_prompts is not None:
            event_prompts.vocab.save(hf_dir)  # the export is an event model again
        if hf_dir:
            trackers.log_artifact("hf", Path(hf_dir))
        policy_summary = policy.call("summary")[0]
        trackers.finish("finished")
    except BaseException as err:
        trackers.finish(runs.end_status(err))
        raise
    finally:
        progress.close()
        policy.shutdown()
        for group in (rollout, reference, reward):
            if group is not None:
                group.shutdown()
        if pools is not None:
            pools.remove()
    summary = {
        "recipe": "grpo",
        "status": "finished",
        "steps": cfg.training.max_steps,
        "final": metrics,
        "first_reward": first_reward,
        "eval_before": first_eval,
        "eval_after": last_eval,
        "skipped_samples": {"train": prompts.skips()},
        "num_prompts": prompts.handed_out,
        "weight_version": controller.version,
        "tokens_generated": controller.tokens_generated,
        "wall_time_s": timer.elapsed_s,
        "hf_dir": hf_dir,
        "local": r.local,
        **policy_summary,
    }
    if event_prompts is not None:
        summary["events"] = event_prompts.stats
        summary["events_eval"] = _event_rankings(cfg, event_prompts, hf_dir, tokenizer.pad_id)
    write_summary(out, summary)
    runs.mark_ended(out, "finished")
    return summary


def _event_rankings(cfg: JobConfig, event_prompts, hf_dir: str | None, pad_id: int) -> dict:
    """Held-out recall/NDCG of the constrained beam search, of the starting model and of the export."""
    from posttrain.events.rl import ranking_report
    from posttrain.models.hf_io import load_pretrained

    report = {}
    for name, path in (("before", cfg.model.path), ("after", hf_dir)):
        if path is not None:
            report[name] = ranking_report(load_pretrained(path)[0], event_prompts, pad_id)
    for k in cfg.events.eval_ks:
        key = f"recall@{k}"
        print(
            f"[grpo] held-out {key} (beam search): "
            + ", ".join(f"{n} {m[key]:.4f}" for n, m in report.items())
        )
    return report


main = train
