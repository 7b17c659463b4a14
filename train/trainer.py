"""LoRA / task-head training and base pretraining with optax, evaluation, Orbax checkpoints.

`train_adapter` trains only an adapter: `lora = {module path: {a [D_in, r], b [r, D_out]}}` on
every module that carries LoRA slots (scale alpha / r; A uniform in +-1/sqrt(D_in), B zero, so
training starts at the base model) and, when every task has a bounded label set, a task head
{kernel [D, labels], bias [labels]} on the last prompt token's hidden state. The base weights
are never written. `pretrain_base` trains every nnx.Param of the model instead (base mode).

Optimiser: clip by global norm, then AdamW with linear warm-up and cosine decay to
lr * min_lr_ratio (weight decay on matrices only). Checkpoints (Orbax, in `workdir/ckpt`)
hold the trained tree, the optimiser state and the step; batches are indexed by step (see
train.data), so a resumed run replays exactly the batches an uninterrupted one would see and
ends bit-identical to it on the same machine. `workdir/train_meta.json` records what is
being trained: resuming with other tasks, model or settings is refused.
"""

import dataclasses
import functools
import json
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from valora_jax.adapters import Adapter, TaskHead, make_adapter
from valora_jax.lora import adapter_slots
from valora_jax.model import LMM

from train import forward as fwd
from train.data import layout_for, train_dataset
from train.evaluate import adapter_tree, evaluate, module_shapes
from train.tasks import SPLITS, Task, get_task


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run."""

    steps: int = 600
    """Optimiser steps."""
    batch_size: int = 32
    learning_rate: float = 2e-3
    """Peak learning rate (after warm-up)."""
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    """The cosine decay ends at learning_rate * min_lr_ratio."""
    weight_decay: float = 0.0
    """Decoupled AdamW weight decay, applied to matrices only."""
    grad_clip: float = 1.0
    """Clip gradients to this global norm (0: no clipping)."""
    rank: int = 16
    """LoRA rank r (adapter mode)."""
    alpha: float = 32.0
    """LoRA alpha; the scale is alpha / r."""
    head: bool = True
    """Train a task head when every task has a bounded label set (adapter mode)."""
    head_weight: float = 1.0
    """Weight of the head's cross-entropy next to the answer-token loss."""
    examples_per_task: int = 4096
    """Training examples per task and epoch."""
    eval_examples: int = 200
    """Examples per task for evaluation."""
    eval_split: str = "val"
    """Split evaluated during and at the end of training."""
    eval_every: int = 0
    """Steps between evaluations (0: only at the end)."""
    eval_batch_size: int = 64
    checkpoint_every: int = 100
    """Steps between checkpoints (0: none; the last step is always saved when a workdir is given)."""
    log_every: int = 10
    seed: int = 0
    """Data order and adapter initialisation."""

    def __post_init__(self):
        for name in ("steps", "batch_size", "examples_per_task", "eval_examples", "eval_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_split not in SPLITS:
            raise ValueError(f"unknown eval_split {self.eval_split!r}; expected one of {SPLITS}")
        if not 0 <= self.min_lr_ratio <= 1 or self.learning_rate <= 0:
            raise ValueError(f"need learning_rate > 0 and 0 <= min_lr_ratio <= 1, got {self.learning_rate}, "
                             f"{self.min_lr_ratio}")


_RESUME_FREE = ("eval_examples", "eval_every", "eval_batch_size", "checkpoint_every", "log_every")
"""TrainConfig fields that may differ between a run and its resumption."""


@dataclasses.dataclass
class TrainResult:
    """A finished run: the trained tree (numpy), its per-task accuracy on cfg.eval_split, and the
    history [{step, loss, ..., accuracy?}]."""

    tasks: tuple[str, ...]
    lora: dict | None
    head: dict | None
    labels: tuple[str, ...] | None
    rank: int
    alpha: float
    accuracy: dict[str, float]
    history: list[dict]
    params: nnx.State | None = None
    """Base mode: the trained parameters."""

    def to_adapter(self, name: str, base_id: str) -> Adapter:
        """The trained adapter as a valora Adapter (with its TaskHead when one was trained)."""
        if self.lora is None:
            raise ValueError("a base-pretraining result has no adapter")
        head = None if self.head is None else TaskHead(np.asarray(self.head["kernel"]), np.asarray(self.head["bias"]),
                                                        self.labels)
        return make_adapter(name, base_id, {p: (w["a"], w["b"]) for p, w in self.lora.items()}, self.alpha, head)


def init_lora(model: LMM, rank: int, seed: int) -> dict:
    """A fresh adapter on every slot-carrying module: A uniform in +-1/sqrt(D_in), B zeros."""
    if not 1 <= rank <= model.config.lora.max_rank:
        raise ValueError(f"rank {rank} outside 1..max_rank={model.config.lora.max_rank}")
    key = jax.random.key(seed)
    lora = {}
    for i, (module, slots) in enumerate(adapter_slots(model)):
        bound = 1.0 / np.sqrt(slots.d_in)
        a = jax.random.uniform(jax.random.fold_in(key, i), (slots.d_in, rank), jnp.float32, -bound, bound)
        lora[module] = {"a": a, "b": jnp.zeros((rank, slots.d_out), jnp.float32)}
    if not lora:
        raise ValueError(f"model {model.config.name} has no LoRA target modules")
    return lora


def _warm_head(init_head, init_labels, labels: Sequence[str], width: int) -> dict:
    """A head over `labels`: columns of labels the initial head knows are copied, new ones start at zero."""
    kernel, bias = np.zeros((width, len(labels)), np.float32), np.zeros((len(labels),), np.float32)
    if init_head is not None:
        for j, label in enumerate(labels):
            if label in init_labels:
                k = init_labels.index(label)
                kernel[:, j], bias[j] = init_head["kernel"][:, k], init_head["bias"][k]
    return {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}


def _optimizer(cfg: TrainConfig):
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, cfg.warmup_steps,
                                                  max(cfg.steps, cfg.warmup_steps + 1),
                                                  cfg.learning_rate * cfg.min_lr_ratio)
    decay_mask = lambda tree: jax.tree.map(lambda x: x.ndim >= 2, tree)
    adamw = optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=decay_mask)
    return (optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw) if cfg.grad_clip > 0 else adamw), schedule


@functools.lru_cache(maxsize=8)
def _step_fn(graphdef, cfg: TrainConfig, mode: str):
    """jitted (trainable, opt_state, params, rest, scales, batch) -> (trainable, opt_state, metrics)."""
    tx, _ = _optimizer(cfg)

    def objective(trainable, params, rest, scales, batch):
        parts = fwd.Parts(graphdef, params, rest)
        if mode == "base":
            return fwd.loss(parts, trainable, None, scales, None, batch)
        return fwd.loss(parts, params, trainable["lora"], scales, trainable.get("head"), batch, cfg.head_weight)

    def step(trainable, opt_state, params, rest, scales, batch):
        (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(trainable, params, rest, scales, batch)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        metrics = {**metrics, "grad_norm": optax.tree.norm(grads)}
        return optax.apply_updates(trainable, updates), opt_state, metrics

    return jax.jit(step, donate_argnums=(0, 1))


def _meta(mode: str, tasks: Sequence[str], base_id: str, cfg: TrainConfig, labels) -> dict:
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _RESUME_FREE}
    return {"mode": mode, "tasks": list(tasks), "base_id": base_id, "labels": labels and list(labels),
            "settings": settings}


def _open_checkpoints(workdir: Path, meta: dict) -> ocp.CheckpointManager:
    """The run's checkpoint manager; ValueError when workdir holds another run's checkpoints."""
    workdir.mkdir(parents=True, exist_ok=True)
    meta_path = workdir / "train_meta.json"
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_text())
        except ValueError as e:
            raise ValueError(f"{meta_path}: corrupt training metadata ({e})") from e
        if old != meta:
            diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            if "settings" in diff:
                diff.remove("settings")
                diff += sorted(f"settings.{k}" for k in set(old["settings"]) | set(meta["settings"])
                               if old["settings"].get(k) != meta["settings"].get(k))
            raise ValueError(f"{workdir} holds checkpoints of another run (differs in {diff}); "
                             f"use a fresh workdir or the same settings")
    else:
        meta_path.write_text(json.dumps(meta, indent=2))
    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
    return ocp.CheckpointManager(workdir / "ckpt", options=options)


def _restore(manager: ocp.CheckpointManager, state: dict) -> tuple[dict, int]:
    """(state, step) from the latest checkpoint, or (state, 0) when there is none."""
    step = manager.latest_step()
    if step is None:
        return state, 0
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    try:
        restored = manager.restore(step, args=ocp.args.StandardRestore(target))
        leaves = jax.tree.leaves(restored)
        state = jax.tree.unflatten(jax.tree.structure(state), [jnp.asarray(x) for x in leaves])
    except Exception as e:   # orbax raises many types for missing/corrupt/mismatched files
        raise ValueError(f"{manager.directory}: cannot restore checkpoint of step {step} ({e})") from e
    return state, int(step)


def _progress(total: int, initial: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)


def _fit(parts: fwd.Parts, trainable, scales, mode: str, cfg: TrainConfig, tasks: Sequence[Task], layout,
         evaluate_fn: Callable, workdir, meta: dict, progress: bool, callback) -> tuple:
    """The training loop shared by both modes -> (trainable, history)."""
    tx, schedule = _optimizer(cfg)
    state = {"trainable": trainable, "opt_state": tx.init(trainable)}
    manager = _open_checkpoints(Path(workdir), meta) if workdir is not None else None
    bar = None
    try:
        start = 0
        if manager is not None:
            state, start = _restore(manager, state)
        trainable, opt_state = state["trainable"], state["opt_state"]
        step_fn = _step_fn(parts.graphdef, cfg, mode)
        history = []
        desc = "+".join(t.name for t in tasks)
        bar = _progress(cfg.steps, start, progress, desc)
        batches = iter(train_dataset(tasks, layout, cfg.batch_size, cfg.seed, cfg.examples_per_task)[start:]
                       .to_iter_dataset(grain.ReadOptions(num_threads=min(16, os.cpu_count() or 1), prefetch_buffer_size=32)))
        params = None if mode == "base" else parts.params
        tic = time.perf_counter()
        for step in range(start + 1, cfg.steps + 1):
            trainable, opt_state, metrics = step_fn(trainable, opt_state, params, parts.rest, scales, next(batches))
            if step % cfg.log_every == 0 or step == cfg.steps:
                record = {"step": step, **{k: float(v) for k, v in jax.device_get(metrics).items()},
                          "lr": float(schedule(step - 1))}
                history.append(record)
                if bar is not None:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                elif progress:
                    print(f"[{desc}] step {step}/{cfg.steps} loss {record['loss']:.4f} "
                          f"({(time.perf_counter() - tic) / (step - start):.3f} s/step)", flush=True)
            if bar is not None:
                bar.update(1)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                accuracy = evaluate_fn(trainable)
                history.append({"step": step, "accuracy": accuracy})
                if progress:
                    print(f"[{desc}] step {step}: {_fmt(accuracy)}", flush=True)
            if manager is not None and ((cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
                                        or step == cfg.steps):
                manager.save(step, args=ocp.args.StandardSave({"trainable": trainable, "opt_state": opt_state}))
            if callback is not None:
                callback(step, metrics)
    finally:
        if bar is not None:
            bar.close()
        if manager is not None:
            manager.wait_until_finished()
            manager.close()
    return trainable, history


def _fmt(accuracy: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items())


def _tasks(names_or_tasks) -> list[Task]:
    tasks = [get_task(t) if isinstance(t, str) else t for t in names_or_tasks]
    if not tasks:
        raise ValueError("no tasks given")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"tasks listed twice: {names}")
    return tasks


def train_adapter(model: LMM, tasks, cfg: TrainConfig = TrainConfig(), *, workdir=None, init: Adapter | None = None,
                  progress: bool = True, callback: Callable | None = None) -> TrainResult:
    """Train an adapter (and a head, when cfg.head and every task has labels) on the tasks' train
    splits; evaluate on cfg.eval_split. init: start from this adapter's weights (same rank).
    workdir: checkpoints, resumed from when present. callback(step, metrics) after every step."""
    tasks = _tasks(tasks)
    config = model.config
    parts = fwd.split_for_training(model)
    layout = layout_for(tasks, config)
    labels = layout.labels if cfg.head else None
    if init is None:
        lora = init_lora(model, cfg.rank, cfg.seed)
        init_head = init_labels = None
    else:
        init.validate(config, module_shapes(model))
        if init.rank != cfg.rank or {a.shape[1] for a, _ in init.weights.values()} != {cfg.rank}:
            raise ValueError(f"initial adapter {init.name!r} has rank {init.rank}, training rank is {cfg.rank}")
        lora, _, init_head, init_labels = adapter_tree(init)
        lora = jax.tree.map(jnp.asarray, lora)
    scales = {p: jnp.float32(cfg.alpha / cfg.rank) for p in lora}
    trainable = {"lora": lora}
    if labels is not None:
        trainable["head"] = _warm_head(init_head, init_labels, labels, config.text.hidden_size)

    def evaluate_fn(tr):
        return {t.name: evaluate(parts, config, t, lora=tr["lora"], scales=scales, head=tr.get("head"),
                                 labels=labels if "head" in tr else None, split=cfg.eval_split,
                                 n=cfg.eval_examples, seed=cfg.seed, batch_size=cfg.eval_batch_size)
                for t in tasks}

    meta = _meta("adapter", [t.name for t in tasks], config.base_id, cfg, labels)
    trainable, history = _fit(parts, trainable, scales, "adapter", cfg, tasks, layout, evaluate_fn, workdir,
                              meta, progress, callback)
    accuracy = evaluate_fn(trainable)
    history.append({"step": cfg.steps, "accuracy": accuracy})
    if progress:
        print(f"[{'+'.join(meta['tasks'])}] {cfg.eval_split} accuracy: {_fmt(accuracy)}", flush=True)
    host = jax.device_get(trainable)
    return TrainResult(tuple(meta["tasks"]), host["lora"], host.get("head"), labels, cfg.rank, cfg.alpha, accuracy,
                       history)


def pretrain_base(model: LMM, tasks=("scene_caption", "language"), cfg: TrainConfig = TrainConfig(), *,
                  workdir=None, progress: bool = True, callback: Callable | None = None) -> TrainResult:
    """Train every nnx.Param of `model` on the tasks (default: the generic pretraining corpus) and
    write the trained parameters back into `model`; result.params holds them too."""
    tasks = _tasks(tasks)
    config = model.config
    parts = fwd.split_for_training(model)
    layout = layout_for(tasks, config)
    trainable = jax.tree.map(jnp.array, parts.params)      # a copy: the step donates its input

    def evaluate_fn(params):
        return {t.name: evaluate(parts, config, t, params=params, split=cfg.eval_split, n=cfg.eval_examples,
                                 seed=cfg.seed, batch_size=cfg.eval_batch_size) for t in tasks}

    meta = _meta("base", [t.name for t in tasks], config.base_id, cfg, None)
    trainable, history = _fit(parts, trainable, {}, "base", cfg, tasks, layout, evaluate_fn, workdir, meta,
                              progress, callback)
    nnx.update(model, trainable)
    accuracy = evaluate_fn(trainable)
    history.append({"step": cfg.steps, "accuracy": accuracy})
    if progress:
        print(f"[base] {cfg.eval_split} accuracy: {_fmt(accuracy)}", flush=True)
    return TrainResult(tuple(meta["tasks"]), None, None, None, 0, 0.0, accuracy, history, params=trainable)
