"""`valora` command line: generate, info, serve (the OpenAI-compatible HTTP server), and import of
Hugging Face models (import-hf) and PEFT LoRA adapters (import-peft); training commands
(train-adapter, generate-adapters, eval) come from train/cli.py.

Models: `--model` takes a checkpoint directory or a preset name; by default the embedded
model in checkpoints/default, or, while no trained checkpoint exists there, the `tiny`
preset randomly initialised with seed 0 (the output says so).
"""

import argparse
import os
import sys
import time
from pathlib import Path

CHECKPOINTS = Path(os.environ.get("VALORA_CHECKPOINTS", Path(__file__).resolve().parents[1] / "checkpoints"))


def _load_model(spec: str | None):
    from valora_jax import PRESETS, init_model, load_model

    if spec is None:
        default = CHECKPOINTS / "default"
        if (default / "config.json").exists():
            return load_model(default), f"embedded default ({default})"
        return init_model(PRESETS["tiny"](), seed=0), ("tiny preset, RANDOMLY INITIALISED (seed 0): "
                                                       f"no trained checkpoint in {default}")
    if spec in PRESETS:
        return init_model(PRESETS[spec](), seed=0), f"{spec} preset, RANDOMLY INITIALISED (seed 0)"
    if not (Path(spec) / "config.json").exists():
        raise SystemExit(f"error: --model {spec!r} is neither a preset {sorted(PRESETS)} nor a model directory")
    from valora_jax.hf_model import is_hf_checkpoint

    try:
        return load_model(spec), (f"{spec}, Hugging Face checkpoint (not converted)" if is_hf_checkpoint(spec)
                                  else spec)
    except ValueError as e:
        raise SystemExit(f"error: --model {spec!r}: {e}")


def _tokenizer_for(spec: str | None):
    """The model directory's tokenizer (HF tokenizer.json when there is one), else the byte tokenizer."""
    from valora_jax.hf_tokenizer import load_tokenizer

    directory = spec if spec is not None and (Path(spec) / "config.json").exists() else None
    try:
        return load_tokenizer(directory)
    except ValueError as e:
        raise SystemExit(f"error: --model {spec!r}: {e}")


def _parse_adapter(spec: str) -> tuple[str, Path]:
    name, sep, directory = spec.partition("=")
    if not sep or not name or not directory:
        raise SystemExit(f"error: --adapter expects NAME=DIR, got {spec!r}")
    return name, Path(directory)


def _runner(model, args, system=None):
    """The model's runner on the backends args.backend / args.attention name (the serving system's
    LoRA kernel where it runs its own: ServingSystem.backend), said on stderr."""
    import jax

    from valora_jax import ModelRunner, resolve_backends
    from valora_jax.runtime import lora_kernels

    try:
        backend, attention = resolve_backends(args.backend, args.attention)
        runner = ModelRunner(model, backend=system.backend(backend) if system else backend, attention=attention)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    auto = lambda choice: " (auto)" if choice == "auto" else ""
    kernels = lora_kernels(runner.backend)
    kernels = f" [{kernels} ATMM kernels]" if kernels else ""
    print(f"backends: LoRA {runner.backend}{kernels}{auto(args.backend)}, attention {runner.attention}"
          f"{auto(args.attention)}, on JAX platform {jax.default_backend()}", file=sys.stderr)
    return runner


def _setup(args):
    from valora_jax import AdapterPool, load_adapter

    model, origin = _load_model(args.model)
    runner = _runner(model, args)
    pool = AdapterPool(runner.config, runner.module_shapes, runner.write_slot)
    for spec in args.adapter:
        name, directory = _parse_adapter(spec)
        try:
            pool.register(load_adapter(directory, runner.config, runner.module_shapes, name=name))
        except ValueError as e:
            raise SystemExit(f"error: adapter {name!r}: {e}")
    return runner, pool, origin


def _stack() -> str:
    from valora_jax.versions import stack_versions, versions_line

    versions = stack_versions()
    return f"{versions_line(versions)}; JAX backend {versions['backend']} ({versions['device']})"


def cmd_info(args) -> None:
    from valora_jax import count_params

    runner, pool, origin = _setup(args)
    cfg = runner.config
    print(f"stack: {_stack()}")
    print(f"model: {cfg.name} ({origin})")
    print(f"base id: {cfg.base_id}")
    print(f"parameters: {count_params(cfg):,}")
    print(cfg.to_json())
    print(f"LoRA: {len(runner.module_shapes)} targeted modules, {cfg.lora.max_loras} slots, "
          f"max rank {cfg.lora.max_rank}, backend {runner.backend}; attention backend {runner.attention}")
    for name, a in pool.store.items():
        head = f", task head over {len(a.head.labels)} labels" if a.head else ""
        print(f"adapter {name}: rank {a.rank}, alpha {a.alpha}, targets {list(a.targets)}{head}")


def cmd_generate(args) -> None:
    from serve.generate import Generator
    from valora_jax import Request

    runner, pool, origin = _setup(args)
    use = args.use or (_parse_adapter(args.adapter[0])[0] if len(args.adapter) == 1 else None)
    if use is None and len(args.adapter) > 1:
        raise SystemExit("error: several --adapter given; choose one with --use NAME")
    print(f"model: {runner.config.name} ({origin}); adapter: {use or 'none'}", file=sys.stderr)
    request = Request(args.prompt, [Path(p) for p in args.image], adapter=use, max_tokens=args.max_tokens,
                      temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    start = time.perf_counter()
    try:
        completion = Generator(runner, pool, _tokenizer_for(args.model)).generate([request])[0]
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    print(completion.text)
    print(f"[{completion.prompt_tokens} prompt tokens, {len(completion.token_ids)} generated, "
          f"finish: {completion.finish_reason}, {time.perf_counter() - start:.1f} s]", file=sys.stderr)


def _with_max_loras(model, max_loras: int):
    """The same base weights with a LoRA pool of `max_loras` slots (the pool is not part of the base
    weights: adapters made for the model still fit, base_id is unchanged)."""
    import dataclasses

    from valora_jax.model import with_lora

    try:
        return with_lora(model, dataclasses.replace(model.config.lora, max_loras=max_loras))
    except ValueError as e:
        raise SystemExit(f"error: --max-loras {max_loras}: {e}")


def _serve_adapters(args) -> list[tuple[str, Path, bool]]:
    """(name, directory, required): the --adapter ones, or with no --model and no --adapter the
    embedded default's adapters under checkpoints/adapters/* (skipped with a warning if they do not fit)."""
    if args.adapter or args.model is not None:
        return [(*_parse_adapter(spec), True) for spec in args.adapter]
    found = sorted(p.parent for p in (CHECKPOINTS / "adapters").glob("*/adapter.json"))
    return [(d.name, d, False) for d in found]


def _calibration_requests(config, adapters: list[str], n: int) -> list:
    """n requests of one random image and 32 generated tokens each (through stop tokens): half on
    the first adapter (merged and mixture steps), half spread over all of them."""
    import numpy as np

    from valora_jax import Request

    rng, size = np.random.default_rng(0), config.vision.image_size
    return [Request("Describe the image.", [rng.integers(0, 256, (size, size, 3), np.uint8)],
                    adapter=adapters[0 if i % 2 == 0 else i % len(adapters)], max_tokens=32, ignore_eos=True)
            for i in range(n)]


def serving_engine(args):
    """The engine `valora serve` runs for its parsed arguments, ready to take traffic: the model,
    the runner on its backends, the adapters, serve's configuration for this platform, every
    step shape precompiled where that configuration says so, and ours' step-time model
    calibrated. Each phase is said on stderr."""
    from serve.api_schema import Limits
    from serve.config import precompile, serving_config
    from serve.engine import Engine
    from serve.policies import SYSTEMS
    from valora_jax import MODES, AdapterPool, load_adapter
    from valora_jax.adapters import layout_of

    model, origin = _load_model(args.model)
    if args.max_loras is not None:
        model = _with_max_loras(model, args.max_loras)
    runner = _runner(model, args, SYSTEMS[args.policy])
    pool = AdapterPool(runner.config, runner.module_shapes, runner.write_slot)
    for name, directory, required in _serve_adapters(args):
        try:
            pool.register(load_adapter(directory, runner.config, runner.module_shapes, name=name))
        except ValueError as e:
            if required:
                raise SystemExit(f"error: adapter {name!r}: {e}")
            print(f"warning: skipping embedded adapter {name!r}: {e}", file=sys.stderr)
    try:
        loop = {} if args.decode_loop is None else {"decode_loop": args.decode_loop}
        config = serving_config(runner.config, max_images=Limits().max_images, max_queue=args.max_queue, **loop)
        engine = Engine(runner, pool, config=config, policy=args.policy, tokenizer=_tokenizer_for(args.model))
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if config.precompile:
        tic = time.perf_counter()
        n = precompile(runner, config, MODES if runner.config.lora.mergeable else ("unmerged",),
                       vocab_size=engine.tokenizer.vocab_size, layouts=[layout_of(a) for a in pool.store.values()])
        print(f"{n} step variants and encoder batches compiled in {time.perf_counter() - tic:.0f} s", file=sys.stderr)
    if args.policy == "ours" and pool.store and args.calibration_requests > 0:
        tic = time.perf_counter()
        steps = engine.calibrate(_calibration_requests(runner.config, sorted(pool.store), args.calibration_requests))
        print(f"ours' step-time model calibrated on {steps} probe steps in {time.perf_counter() - tic:.1f} s",
              file=sys.stderr)
    print(f"model: {runner.config.name} ({origin}); adapters: {sorted(pool.store) or 'none'}; "
          f"{runner.config.lora.max_loras} adapter slots; policy {args.policy}; adapter root {args.adapter_root}",
          file=sys.stderr)
    return engine


def cmd_serve(args) -> None:
    from serve.server import Server, create_app
    from serve.service import EngineService
    from valora_jax import frozen_heap

    engine = serving_engine(args)
    app = create_app(EngineService(engine), adapter_root=args.adapter_root,
                     api_key=args.api_key or os.environ.get("VALORA_API_KEY") or None,
                     media_roots=tuple(args.allowed_local_media_path))
    print(f"stack: {_stack()}", file=sys.stderr)
    with frozen_heap():                     # what start-up built is never scanned while serving
        Server(app, args.host, args.port).run()


def cmd_import_hf(args) -> None:
    from valora_jax import LoraConfig
    from valora_jax.config import ALL_TARGETS
    from valora_jax.hf_model import import_hf

    targets = ALL_TARGETS if args.lora_targets == "all" else tuple(t for t in args.lora_targets.split(",") if t)
    try:
        lora = LoraConfig(max_loras=args.max_loras, max_rank=args.max_rank, targets=targets)
        config = import_hf(args.src, args.out, lora=lora, dtype=args.dtype, name=args.name)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    print(f"imported {config.name} ({config.dtype}, base id {config.base_id}) into {args.out}; "
          f"LoRA targets {list(config.lora.targets)}, {config.lora.max_loras} slots, max rank {config.lora.max_rank}")


def cmd_import_peft(args) -> None:
    from valora_jax.checkpoint import load_config
    from valora_jax.hf_peft import import_peft

    if not (Path(args.model) / "config.json").exists():
        raise SystemExit(f"error: --model {args.model!r} is not a model directory")
    try:
        adapter = import_peft(args.src, args.out, load_config(args.model), name=args.name,
                              check_base=not args.ignore_base_name)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    print(f"imported adapter {adapter.name!r} (rank {adapter.rank}, targets {list(adapter.targets)}, "
          f"{len(adapter.weights)} modules) for {adapter.base_id} into {args.out}")


def build_parser() -> argparse.ArgumentParser:
    """The `valora` command line."""
    from serve.policies import SYSTEMS
    from valora_jax.decoder import ATTENTION_BACKENDS
    from valora_jax.lora import BACKENDS

    parser = argparse.ArgumentParser(prog="valora", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", help="checkpoint directory or preset name (default: embedded)")
    common.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="load an adapter")
    common.add_argument("--backend", default="auto", choices=("auto", *BACKENDS),
                        help="LoRA backend (auto: pallas on a GPU, running the ATMM kernels its tile table names; "
                             "reference elsewhere)")
    common.add_argument("--attention", default="auto", choices=("auto", *ATTENTION_BACKENDS),
                        help="paged-attention backend (auto: the pallas kernels on a GPU, reference elsewhere)")
    info = sub.add_parser("info", parents=[common], help="config, parameter counts, adapters")
    info.set_defaults(func=cmd_info)
    gen = sub.add_parser("generate", parents=[common], help="answer one prompt about images")
    gen.add_argument("--image", nargs="*", default=[], metavar="PATH")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--use", metavar="NAME", help="which loaded adapter answers (default: the only one)")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=cmd_generate)
    srv = sub.add_parser("serve", parents=[common], help="OpenAI-compatible HTTP server")
    srv.add_argument("--adapter-root", default=str(CHECKPOINTS / "adapters"), metavar="DIR",
                     help="the only directory /v1/load_lora_adapter reads adapters from (default: %(default)s)")
    srv.add_argument("--max-loras", type=int, metavar="N", help="device adapter slots (default: the model's)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on /v1 (or $VALORA_API_KEY)")
    srv.add_argument("--policy", default="ours", choices=tuple(SYSTEMS),
                     help="serving system: its orchestration policy, switch and LoRA kernel (serve.policies.SYSTEMS)")
    srv.add_argument("--max-queue", type=int, default=256, help="waiting requests beyond this get 429")
    srv.add_argument("--decode-loop", type=int, metavar="N",
                     help="decode steps per device call while every request decodes (default: the platform's)")
    srv.add_argument("--calibration-requests", type=int, default=16, metavar="N",
                     help="with policy ours: requests of a start-up probe that measures each mode's step time "
                          "before serving (0: none; ours then learns from the prior)")
    srv.add_argument("--allowed-local-media-path", action="append", default=[], metavar="DIR",
                     help="directory that file:// image URLs may read from (repeatable; default: none)")
    srv.set_defaults(func=cmd_serve)
    imp = sub.add_parser("import-hf", help="convert a Hugging Face LLaVA checkpoint directory")
    imp.add_argument("src", help="directory with config.json, *.safetensors, tokenizer.json, ...")
    imp.add_argument("out", help="new valora model directory (must not exist)")
    imp.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                     help="comma-separated modules that carry adapter slots (vision.q_proj, projector.linear_1, "
                          "...) or 'all' (default: the decoder's)")
    imp.add_argument("--max-loras", type=int, default=4, help="adapter slots per targeted weight")
    imp.add_argument("--max-rank", type=int, default=64, help="largest adapter rank")
    imp.add_argument("--dtype", choices=("float32", "bfloat16"),
                     help="parameter dtype (default: float32 checkpoints stay float32, others bfloat16)")
    imp.add_argument("--name", help="model name adapters are checked against (default: the source directory's)")
    imp.set_defaults(func=cmd_import_hf)
    imp_peft = sub.add_parser("import-peft", help="convert a PEFT LoRA adapter directory")
    imp_peft.add_argument("src", help="directory with adapter_config.json and adapter_model.safetensors")
    imp_peft.add_argument("out", help="new valora adapter directory (must not exist)")
    imp_peft.add_argument("--model", required=True, help="the model directory (imported or Hugging Face) it adapts")
    imp_peft.add_argument("--name", help="adapter name (default: the source directory's)")
    imp_peft.add_argument("--ignore-base-name", action="store_true",
                          help="accept an adapter whose base_model_name_or_path names another model")
    imp_peft.set_defaults(func=cmd_import_peft)
    from train.cli import add_commands as add_training_commands   # train-adapter, generate-adapters, eval

    add_training_commands(sub, _load_model)
    return parser


def main(argv: list[str] | None = None) -> None:
    from valora_jax.runtime import use_serving_xla_flags

    args = build_parser().parse_args(argv)
    use_serving_xla_flags()
    _enable_compilation_cache()
    args.func(args)


def _enable_compilation_cache() -> None:
    """Reuse compiled steps across runs (~/.cache/valora-jax/xla, or $VALORA_XLA_CACHE; "off": none)."""
    import jax

    if os.environ.get("VALORA_XLA_CACHE") == "off":
        return
    cache = Path(os.environ.get("VALORA_XLA_CACHE", Path.home() / ".cache" / "valora-jax" / "xla"))
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


if __name__ == "__main__":
    main()
