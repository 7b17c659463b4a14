"""Orbax checkpoints of base models and adapters.

Model directory:   config.json (LMMConfig)  +  params/ (Orbax: the nnx.Param state)
Adapter directory: adapter.json (name, base_id, alpha, rank, targets, per-module rank and
                   scale, task-head labels)  +  weights/ (Orbax: {module path: {a, b}}, head)
An adapter is validated against the model it is loaded for (base id, modules, shapes, rank).
"""

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from valora_jax.adapters import Adapter, TaskHead
from valora_jax.config import LMMConfig
from valora_jax.hf_model import fill_tree, flatten_tree, hf_config, is_hf_checkpoint, load_hf_model
from valora_jax.lora import fuse_parameters, fused_layout
from valora_jax.model import LMM, split_model

ADAPTER_FORMAT = 1


@contextlib.contextmanager
def atomic_directory(out: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `out` that replaces `out` (absent or empty) when the
    block succeeds and is deleted when it fails, so `out` never holds a half-written result."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_model(directory: str | Path, model: LMM) -> None:
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(model.config.to_json())
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "params", params, force=True)


def load_config(directory: str | Path) -> LMMConfig:
    if is_hf_checkpoint(directory):
        return hf_config(directory)
    path = Path(directory) / "config.json"
    try:
        return LMMConfig.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: not a valid model config ({e})") from e


def load_model(directory: str | Path) -> LMM:
    """Restore a model saved by save_model (or read a Hugging Face LLaVA directory); LoRA slots
    start empty. A checkpoint written before q/k/v and gate/up were fused (each its own linear)
    is fused as it loads."""
    if is_hf_checkpoint(directory):
        return load_hf_model(directory)
    directory = Path(directory).absolute()
    config = load_config(directory)
    abstract = nnx.eval_shape(lambda: LMM(config, rngs=nnx.Rngs(0)))
    graphdef, abs_params, abs_lora, abs_merged = split_model(abstract)
    expected = nnx.to_pure_dict(abs_params)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            saved = ckptr.metadata(directory / "params").item_metadata
            target = fill_tree(saved, {p: np.zeros(m.shape, m.dtype) for p, m in flatten_tree(saved)})
            restored = ckptr.restore(directory / "params", target)
    except Exception as e:   # orbax raises many types for missing/corrupt/mismatched files
        raise ValueError(f"{directory / 'params'}: cannot restore parameters for {config.name} ({e})") from e
    flat = fuse_parameters(dict(flatten_tree(restored)), fused_layout(abstract))
    want = dict(flatten_tree(expected))
    spec = lambda x: (tuple(x.shape), jnp.dtype(x.dtype))
    wrong = sorted(p for p in set(want) | set(flat) if p not in want or p not in flat or spec(flat[p]) != spec(want[p]))
    if wrong:
        described = [f"{p}: {'missing' if p not in flat else 'unexpected' if p not in want else list(flat[p].shape)}"
                     for p in wrong[:5]]
        raise ValueError(f"{directory / 'params'}: parameters do not match {config.name}: {described}"
                         f"{' ...' if len(wrong) > 5 else ''}")
    nnx.replace_by_pure_dict(abs_params, fill_tree(expected, flat))
    zeros = lambda s: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), s)
    return nnx.merge(graphdef, abs_params, zeros(abs_lora), zeros(abs_merged))


def save_adapter(directory: str | Path, adapter: Adapter) -> None:
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": ADAPTER_FORMAT, "name": adapter.name, "base_id": adapter.base_id, "alpha": adapter.alpha,
        "rank": adapter.rank, "targets": list(adapter.targets),
        "modules": {p: {"rank": int(a.shape[1]), "scale": float(adapter.scales[p])}
                    for p, (a, _) in adapter.weights.items()},
        "head_labels": list(adapter.head.labels) if adapter.head else None,
    }
    tree = {"lora": {p: {"a": np.asarray(a), "b": np.asarray(b)} for p, (a, b) in adapter.weights.items()}}
    if adapter.head:
        tree["head"] = {"kernel": np.asarray(adapter.head.kernel), "bias": np.asarray(adapter.head.bias)}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "weights", tree, force=True)
    (directory / "adapter.json").write_text(json.dumps(meta, indent=2))


def _adapter_of(meta: dict, tree: dict, name: str | None) -> Adapter:
    """The Adapter that adapter.json `meta` and the restored weights `tree` describe; ValueError,
    KeyError or TypeError where they disagree."""
    modules = meta["modules"]
    weights = {p: (np.asarray(w["a"]), np.asarray(w["b"])) for p, w in tree["lora"].items()}
    if set(weights) != set(modules):
        raise ValueError(f"weights for {sorted(set(weights) ^ set(modules))} disagree with adapter.json")
    for p, m in modules.items():
        if weights[p][0].shape[1] != m["rank"]:
            raise ValueError(f"module {p!r} has rank {weights[p][0].shape[1]}, adapter.json says {m['rank']}")
    head = None
    if meta.get("head_labels"):
        if "head" not in tree:
            raise ValueError(f"adapter.json names task-head labels {meta['head_labels']} but the weights hold "
                             "no task head")
        head = TaskHead(np.asarray(tree["head"]["kernel"]), np.asarray(tree["head"]["bias"]),
                        tuple(str(label) for label in meta["head_labels"]))
    return Adapter(name or meta["name"], meta["base_id"], weights, {p: float(m["scale"]) for p, m in modules.items()},
                   float(meta["alpha"]), head)


def load_adapter(directory: str | Path, config: LMMConfig, module_shapes, name: str | None = None) -> Adapter:
    """Read and validate an adapter for `config`; `name` overrides the stored name."""
    directory = Path(directory).absolute()
    meta_path = directory / "adapter.json"
    try:
        meta = json.loads(meta_path.read_text())
        meta["modules"].items()
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{meta_path}: not a valid adapter description ({e})") from e
    if meta.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{meta_path}: adapter format {meta.get('format')!r}, expected {ADAPTER_FORMAT}")
    if meta.get("base_id") != config.base_id:
        raise ValueError(f"adapter at {directory} was made for base model {meta.get('base_id')!r}, "
                         f"this model is {config.base_id!r}")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            tree = ckptr.restore(directory / "weights")
    except Exception as e:
        raise ValueError(f"{directory / 'weights'}: cannot restore adapter weights ({e})") from e
    try:
        adapter = _adapter_of(meta, tree, name)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"adapter at {directory}: adapter.json and the weights disagree "
                         f"({type(e).__name__}: {e})") from e
    adapter.validate(config, module_shapes)
    return adapter
