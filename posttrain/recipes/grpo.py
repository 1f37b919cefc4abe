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

from posttrain.config import JobConfig, dump_job
from posttrain.errors import ConfigError
from posttrain.events.rl import event_prompts
from posttrain.rl.controller import GRPOController
from posttrain.rl.groups import make_groups
from posttrain.rl.prompts import PromptStream, load_eval_prompts
from posttrain.train.run import Run
from posttrain.train.setup import build_tokenizer, check_formats

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
    with Run(cfg.output_dir, "grpo", dump_job(cfg), cfg.metrics, world_size=cfg.rl.policy_workers) as run:
        return _train(cfg, run)


def _train(cfg: JobConfig, run: Run) -> dict:
    r, steps = cfg.rl, cfg.training.max_steps
    opt_steps_per_step = r.iterations_per_batch * r.mini_batches

    # 1. Tokenizer, prompts (streamed, mixed, resumable) and held-out prompts. Event logs become prompt
    #    files first (users' histories as token ids, posttrain/events/rl.py).
    tokenizer = build_tokenizer(cfg.tokenizer)
    events = event_prompts(cfg, tokenizer, run.out)  # None unless data.train holds event logs
    cfg = events.cfg if events else cfg
    max_prompt = cfg.data.max_tokens_per_pack - r.max_new_tokens * r.max_turns
    prompts = PromptStream(cfg.data, tokenizer, seed=cfg.seed, max_prompt_tokens=max_prompt)
    eval_prompts = load_eval_prompts(cfg.data, tokenizer)

    # 2. Worker groups (policy, rollout, reference, reward) and the controller, which holds the algorithm.
    groups = make_groups(cfg, steps * opt_steps_per_step, events.semantic_ids if events else None)
    try:
        for note in groups.policy.call("notes")[0]:
            print(f"[model] {note}")
        controller = GRPOController(
            cfg, tokenizer, groups.policy, groups.rollout, groups.reference, groups.reward, prompts
        )
        start = controller.resume(opt_steps_per_step) if cfg.training.resume else 0
        controller.sync_weights()  # engines start from the policy's weights (fresh or resumed)
        run.open(start or None)

        # 3. The loop: one GRPO step per iteration, on the run's log/eval/save cadence.
        evaluate = (lambda: controller.evaluate(eval_prompts)) if eval_prompts else None
        first_eval = evaluate() if evaluate else {}
        if first_eval and start == 0:
            run.log_eval(0, first_eval)
        rewards: list[float] = []

        def step(n: int) -> dict:
            metrics = controller.step(n)
            rewards.append(metrics["reward/mean"])
            return metrics

        final, last_eval = run.loop(
            cfg.training, start=start, total=steps, step=step, evaluate=evaluate, label="grpo",
            save=lambda: groups.policy.call("save", prompts.state_dict()),
            show=lambda m: {"reward": round(m["reward/mean"], 3), "loss": round(m.get("loss", 0.0), 4)},
        )  # fmt: skip

        # 4. Export and summary.
        hf_dir = groups.policy.call("export")[0] if cfg.training.export_hf else None
        policy_summary = groups.policy.call("summary")[0]
    finally:
        groups.shutdown()
    summary = {
        "recipe": "grpo", "status": "finished", "steps": steps, "final": final,
        "first_reward": rewards[0] if rewards else None,
        "eval_before": first_eval, "eval_after": last_eval or first_eval,
        "skipped_samples": {"train": prompts.skips()}, "num_prompts": prompts.handed_out,
        "weight_version": controller.version, "tokens_generated": controller.tokens_generated,
        "wall_time_s": run.elapsed_s, "hf_dir": hf_dir, "local": r.local, **policy_summary,
    }  # fmt: skip
    if events is not None:
        summary |= events.finish(cfg.model.path, hf_dir, tokenizer.pad_id)
    return run.finish(summary, {"hf": hf_dir})


main = train
