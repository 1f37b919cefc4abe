"""`posttrain <verb>`: run a job, run the demo, verify a model, inspect data.

Each verb imports what it needs when it runs, so `posttrain --help` is instant. User errors
(`PosttrainError`) print as one line on stderr and exit with status 2; bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from posttrain.errors import PosttrainError

RECIPES = {
    # recipe name -> module with `train(cfg) -> summary`; plain data, no registry.
    "pretrain": "posttrain.recipes.pretrain",
    "sft": "posttrain.recipes.sft",
    "dpo": "posttrain.recipes.dpo",
    "rm": "posttrain.recipes.rm",
    "distill": "posttrain.recipes.distill",
}


def _run(args) -> int:
    import importlib

    from posttrain.config import load_job
    from posttrain.launch import restart_count

    overrides = list(args.overrides)
    if args.resume or restart_count() > 0:  # a restarted worker continues from the latest checkpoint
        overrides.append("training.resume=true")
    cfg = load_job(args.config, overrides)  # validated here, before any worker starts
    if args.nproc > 1 or args.launcher == "ray":
        from posttrain.models.build import head_counts
        from posttrain.parallel.world import plan_layout

        plan_layout(cfg.parallelism, args.nproc, **head_counts(cfg.model))  # before any worker starts
        return _launch(args, overrides)
    recipe = importlib.import_module(RECIPES[cfg.recipe])
    summary = recipe.train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    final = summary.get("final", {})
    print(
        f"done: {summary['steps']} steps, loss {final.get('loss', float('nan')):.4f}"
        + (f", eval_loss {final['eval_loss']:.4f}" if "eval_loss" in final else "")
        + f", {summary['wall_time_s']:.1f}s -> {cfg.output_dir}"
    )
    return 0


def _launch(args, overrides: list[str]) -> int:
    if args.launcher == "ray":
        from posttrain.launch_ray import launch_ray

        return launch_ray(
            args.config, overrides, args.nproc, max_restarts=args.max_restarts, address=args.ray_address
        )
    from posttrain.launch import launch_local

    return launch_local(args.config, overrides, args.nproc, max_restarts=args.max_restarts)


def _demo(args) -> int:
    from posttrain.recipes.demo import run_demo

    run_demo(args.output_dir, quick=args.quick)
    return 0


def _inspect(args) -> int:
    from posttrain.config import load_job
    from posttrain.data.inspect import inspect

    cfg = load_job(args.config, args.overrides)
    inspect(cfg, num_samples=args.num_samples, as_json=args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="posttrain", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="verb", required=True)

    run = sub.add_parser("run", help="run the recipe a job file names")
    run.add_argument("config", help="YAML job file")
    run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. training.max_steps=20")
    run.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in output_dir"
    )
    run.add_argument("--nproc", type=int, default=1, help="SPMD worker processes (one per device)")
    run.add_argument(
        "--launcher",
        choices=("local", "ray"),
        default="local",
        help="local: torch's elastic agent on this machine; ray: Ray actors in a placement group",
    )
    run.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="restart all workers from the last checkpoint after a failure",
    )
    run.add_argument(
        "--ray-address", default=None, help="an existing Ray cluster (default: start a local Ray)"
    )
    run.set_defaults(fn=_run)

    demo = sub.add_parser("demo", help="pretrain -> SFT a tiny model on synthetic tasks and report accuracy")
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("--quick", action="store_true", help="a much shorter run (for tests)")
    demo.set_defaults(fn=_demo)

    # Listed for --help only; main() hands its arguments to posttrain.models.verify.
    sub.add_parser("verify-model", help="compare our logits with transformers' (--family F | --hf-dir DIR)")

    data = sub.add_parser("data", help="data tools")
    data_sub = data.add_subparsers(dest="data_verb", required=True)
    insp = data_sub.add_parser("inspect", help="show training samples with loss-bearing tokens marked")
    insp.add_argument("config")
    insp.add_argument("overrides", nargs="*")
    insp.add_argument("--num-samples", type=int, default=3)
    insp.add_argument("--json", action="store_true", help="one JSON object per sample: input_ids, labels")
    insp.set_defaults(fn=_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["verify-model"]:  # its own argparse owns every flag after the verb
        from posttrain.models.verify import main as verify_main

        return verify_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except PosttrainError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
