"""The training subcommands of `valora`: train-adapter, generate-adapters, eval.

serve/cli.py registers them with `add_commands(subparsers, load_model)`; `load_model(spec)`
is the CLI's model loader (-> (LMM, description)). Heavy imports happen inside the commands.
"""

import json
import sys
from pathlib import Path
from typing import Callable


def _model(load_model: Callable, spec: str | None):
    """The model to train or evaluate; the suite speaks the byte tokenizer, so models with a
    tokenizer of their own (Hugging Face checkpoints, imported or not) are refused."""
    from valora_jax.tokenizer import ByteTokenizer

    if spec is not None and (Path(spec) / "tokenizer.json").exists():
        raise SystemExit(f"error: --model {spec!r} has its own tokenizer; the task suite is built for the byte "
                         "tokenizer of valora's own models")
    model, origin = load_model(spec)
    if model.config.text.vocab_size < ByteTokenizer.vocab_size:
        raise SystemExit(f"error: --model {spec!r}: vocabulary {model.config.text.vocab_size} is smaller than the "
                         f"byte tokenizer's {ByteTokenizer.vocab_size}")
    print(f"model: {model.config.name} ({origin})", file=sys.stderr)
    return model


def _train_config(args):
    from train.trainer import TrainConfig

    fields = {"steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.lr, "rank": args.rank,
              "alpha": args.alpha, "head": not args.no_head, "examples_per_task": args.examples_per_task,
              "eval_examples": args.eval_examples, "eval_every": args.eval_every, "seed": args.seed}
    return TrainConfig(**{k: v for k, v in fields.items() if v is not None})


def cmd_train_adapter(args, load_model) -> None:
    from valora_jax.checkpoint import save_adapter
    from train.trainer import train_adapter

    try:
        cfg = _train_config(args)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    model = _model(load_model, args.model)
    name = args.name or "+".join(args.task)
    workdir = Path(args.workdir) if args.workdir else Path(args.out) / "training"
    try:
        result = train_adapter(model, args.task, cfg, workdir=workdir, progress=not args.quiet)
        save_adapter(args.out, result.to_adapter(name, model.config.base_id))
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    head = f", task head over {len(result.labels)} labels" if result.labels else ""
    print(f"adapter {name!r} (rank {result.rank}{head}) saved to {args.out}; val accuracy: "
          + ", ".join(f"{t} {a:.3f}" for t, a in result.accuracy.items()))


def cmd_generate_adapters(args, load_model) -> None:
    import dataclasses

    from train.fusion import ModelTrainer, generate_adapters, load_spec

    try:
        spec = load_spec(args.spec)
        if args.steps is not None:
            spec = dataclasses.replace(spec, train=dataclasses.replace(spec.train, steps=args.steps))
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    model = _model(load_model, args.model)
    try:
        generate_adapters(spec, args.out, ModelTrainer(model, spec.train, progress=not args.quiet))
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    print((Path(args.out) / "report.md").read_text())


def cmd_eval(args, load_model) -> None:
    from valora_jax.checkpoint import load_adapter
    from train.evaluate import evaluate_adapter
    from valora_jax.lora import module_shapes
    from train.forward import split_for_training
    from train.tasks import get_task

    model = _model(load_model, args.model)
    parts = split_for_training(model)
    results = {}
    try:
        tasks = [get_task(t) for t in args.task]
        adapter = None if args.adapter is None else load_adapter(args.adapter, model.config, module_shapes(model))
        for task in tasks:
            acc, pairs = evaluate_adapter(model, adapter, task, split=args.split, n=args.examples, seed=args.seed,
                                          batch_size=args.batch_size, parts=parts, return_predictions=True)
            results[task.name] = acc
            print(f"{task.name}: {acc:.4f} ({task.metric}, {len(pairs)} {args.split} examples, "
                  f"{'adapter ' + repr(adapter.name) if adapter else 'base model'})")
            for pred, ref in pairs[: args.show]:
                print(f"  predicted {pred!r}, reference {ref!r}")
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if args.json:
        print(json.dumps(results))


def add_commands(sub, load_model: Callable) -> None:
    """Register train-adapter, generate-adapters and eval on an argparse subparsers object."""
    model_help = "checkpoint directory or preset name (default: embedded)"
    tr = sub.add_parser("train-adapter", help="train a LoRA adapter (and task head) on tasks of the suite")
    tr.add_argument("--task", action="append", required=True, help="task name (repeat to fuse several)")
    tr.add_argument("--out", required=True, help="adapter directory to write")
    tr.add_argument("--model", help=model_help)
    tr.add_argument("--name", help="adapter name (default: the task names joined by '+')")
    tr.add_argument("--workdir", help="checkpoints for resuming (default: OUT/training)")
    tr.add_argument("--steps", type=int)
    tr.add_argument("--batch-size", type=int)
    tr.add_argument("--lr", type=float, help="peak learning rate")
    tr.add_argument("--rank", type=int)
    tr.add_argument("--alpha", type=float)
    tr.add_argument("--no-head", action="store_true", help="never train a task head")
    tr.add_argument("--examples-per-task", type=int)
    tr.add_argument("--eval-examples", type=int)
    tr.add_argument("--eval-every", type=int)
    tr.add_argument("--seed", type=int)
    tr.add_argument("--quiet", action="store_true", help="no progress output")
    tr.set_defaults(func=lambda a: cmd_train_adapter(a, load_model))
    gen = sub.add_parser("generate-adapters", help="pack tasks into few adapters under accuracy requirements")
    gen.add_argument("--spec", required=True, help="tasks.json: tasks with requirements, order, training settings")
    gen.add_argument("--out", required=True, help="output directory (resumed when it holds an unfinished run)")
    gen.add_argument("--model", help=model_help)
    gen.add_argument("--steps", type=int, help="override the spec's training steps")
    gen.add_argument("--quiet", action="store_true")
    gen.set_defaults(func=lambda a: cmd_generate_adapters(a, load_model))
    ev = sub.add_parser("eval", help="accuracy of the base model or an adapter on tasks of the suite")
    ev.add_argument("--task", action="append", required=True)
    ev.add_argument("--adapter", metavar="DIR", help="adapter directory (default: the base model)")
    ev.add_argument("--model", help=model_help)
    ev.add_argument("--split", default="test", choices=("train", "val", "test"))
    ev.add_argument("--examples", type=int, default=200)
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--show", type=int, default=0, metavar="N", help="print the first N predictions")
    ev.add_argument("--json", action="store_true", help="also print the accuracies as JSON")
    ev.set_defaults(func=lambda a: cmd_eval(a, load_model))
