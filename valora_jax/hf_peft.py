"""PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors) as valora adapters.

PEFT stores, per adapted linear `base_model.model.<module>`, `lora_A.weight [r, D_in]` and
`lora_B.weight [D_out, r]`; the adapted layer computes y = x W + s x A^T B^T with
s = alpha / r (alpha / sqrt(r) with use_rslora), r and alpha per module from rank_pattern /
alpha_pattern when given. A valora adapter stores A^T [D_in, r], B^T [r, D_out] and s.
Options that change the math beyond that (DoRA, biases, modules_to_save, ...) are refused.
"""

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from valora_jax.adapters import Adapter, target_of
from valora_jax.config import ALL_TARGETS, LMMConfig, LoraConfig
from valora_jax.hf_model import _read_json, _safetensors_open, hf_config, is_hf_checkpoint, module_path
from valora_jax.lora import module_shapes
from valora_jax.model import LMM

_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")
_REFUSED = ("use_dora", "lora_bias", "modules_to_save", "fan_in_fan_out", "use_qalora", "layer_replication",
            "target_parameters", "trainable_token_indices", "alora_invocation_tokens", "use_bdlora",
            "velora_config", "monteclora_config", "arrow_config", "kasa_config")
"""adapter_config.json options that must be unset (false / null / empty): each changes the
adapted layers beyond y = x W + s x A B, or adapts modules valora_jax does not carry."""


def module_shapes_for(config: LMMConfig, all_targets: bool = False) -> dict[str, tuple[int, int]]:
    """Module path -> (D_in, D_out) of every linear carrying LoRA slots under config.lora
    (or, with all_targets, every linear that could carry them). No memory is allocated."""
    if all_targets:
        config = dataclasses.replace(config, lora=LoraConfig(max_loras=1, max_rank=1, targets=ALL_TARGETS,
                                                             mergeable=False))
    abstract = nnx.eval_shape(lambda: LMM(config, rngs=nnx.Rngs(0)))
    return module_shapes(abstract)


def _selected(peft: dict, module: str) -> bool:
    """Whether PEFT's target_modules / layers_to_transform select `module` (PEFT's rules: a
    string is a full regex match, a list matches a name or a ".name" suffix)."""
    targets = peft.get("target_modules")
    if targets == "all-linear":           # every linear except the output layer
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    if not targets:
        return False
    if module not in targets and not any(module.endswith(f".{t}") for t in targets):
        return False
    layers = peft.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    patterns = peft.get("layers_pattern")
    patterns = [patterns] if isinstance(patterns, str) else (patterns or [])
    if patterns:
        found = (re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module) for p in patterns)
        match = next((m for m in found if m), None)
    else:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


def _pattern_value(patterns: dict, module: str, default: Any) -> Any:
    """rank_pattern / alpha_pattern lookup: the first key matching a suffix of `module`."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _check_config(peft: dict, path: Path) -> None:
    if peft.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {peft.get('peft_type')!r} is not supported; expected 'LORA'")
    for option in _REFUSED:
        if peft.get(option):
            raise ValueError(f"{path}: {option}={peft[option]!r} is not supported (valora adapters are plain LoRA)")
    if peft.get("bias", "none") != "none":
        raise ValueError(f"{path}: bias={peft['bias']!r} is not supported; expected 'none'")
    for option in ("r", "lora_alpha"):
        if not isinstance(peft.get(option), (int, float)) or peft[option] <= 0:
            raise ValueError(f"{path}: {option}={peft.get(option)!r} must be a positive number")


def _check_base(peft: dict, path: Path, config: LMMConfig) -> None:
    """Refuse an adapter whose base_model_name_or_path clearly names another model: a local HF
    directory of other shapes, or a hub id whose last component differs from the model name's."""
    base = peft.get("base_model_name_or_path")
    if not base:
        return
    if is_hf_checkpoint(base):
        other = hf_config(base)
        if (other.vision, other.text) != (config.vision, config.text):
            raise ValueError(f"{path}: base_model_name_or_path {base!r} is a model of other shapes than "
                             f"{config.name!r}")
        return
    if Path(base).name.lower() != Path(config.name).name.lower():
        raise ValueError(f"{path}: base_model_name_or_path {base!r} names another model than {config.name!r} "
                         "(import the model with that name, or skip this check)")


def read_peft(src: str | Path, config: LMMConfig, *, name: str | None = None, check_base: bool = True) -> Adapter:
    """The valora Adapter of a PEFT LoRA directory, for the model `config` (validated against it).

    name: the adapter name (default: the directory name). check_base: refuse an adapter whose
    base_model_name_or_path names another model. Raises ValueError naming the option, tensor
    or module for anything that cannot be served exactly."""
    src = Path(src)
    cfg_path = src / "adapter_config.json"
    peft = _read_json(cfg_path)
    _check_config(peft, cfg_path)
    if check_base:
        _check_base(peft, cfg_path, config)
    weights_path = src / "adapter_model.safetensors"
    if not weights_path.is_file():
        found = sorted(p.name for p in src.glob("*.bin")) or "none"
        raise ValueError(f"{src}: no adapter_model.safetensors (found .bin files: {found}); only safetensors "
                         "adapters are read")
    tensors = _read_tensors(weights_path)
    carried = module_shapes_for(config, all_targets=True)
    targeted = module_shapes_for(config)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    hf_names: dict[str, str] = {}
    for key, value in tensors.items():
        m = _KEY.fullmatch(key)
        if m is None:
            raise ValueError(f"{weights_path}: tensor {key!r} is not a LoRA A/B weight (embedding LoRA, DoRA "
                             "magnitudes and biases are not supported)")
        module = m.group("module")
        path = module_path(module, config.family)
        if path is None:
            raise ValueError(f"{weights_path}: module {module!r} (tensor {key!r}) is not a LoRA target valora_jax "
                             "carries (decoder attention/MLP, vision-tower attention/MLP, LLaVA's projector linears)")
        if path not in carried:
            raise ValueError(f"{weights_path}: module {module!r} (tensor {key!r}) does not exist in {config.name!r} "
                             f"({config.text.num_layers} decoder, {config.vision.num_layers} vision layers)")
        if path not in targeted:
            raise ValueError(f"{weights_path}: module {module!r} needs LoRA target {target_of(path)!r}, which this "
                             f"model's LoraConfig does not carry (targets: {list(config.lora.targets)}); import the "
                             "model with --lora-targets including it")
        if not _selected(peft, module):
            raise ValueError(f"{weights_path}: module {module!r} has LoRA weights but adapter_config.json's "
                             f"target_modules {peft.get('target_modules')!r} / layers_to_transform "
                             f"{peft.get('layers_to_transform')!r} do not select it")
        pairs.setdefault(path, {})[m.group("ab")] = value
        hf_names[path] = module
    if not pairs:
        raise ValueError(f"{weights_path}: no LoRA weights")
    weights, scales = {}, {}
    for path, ab in sorted(pairs.items()):
        module = hf_names[path]
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{weights_path}: module {module!r} has lora_{'A' if 'A' in ab else 'B'} but not "
                             f"lora_{'B' if 'A' in ab else 'A'}")
        a, b = ab["A"], ab["B"]                                     # [r, D_in], [D_out, r]
        d_in, d_out = carried[path]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != d_in or b.shape[0] != d_out or a.shape[0] != b.shape[1]:
            raise ValueError(f"{weights_path}: module {module!r} has lora_A {list(a.shape)} / lora_B "
                             f"{list(b.shape)}, expected [r, {d_in}] / [{d_out}, r]")
        r = a.shape[0]
        r_config = _pattern_value(peft.get("rank_pattern"), module, peft["r"])
        if r != r_config:
            raise ValueError(f"{weights_path}: module {module!r} has rank {r}, adapter_config.json's r / "
                             f"rank_pattern say {r_config}")
        alpha = float(_pattern_value(peft.get("alpha_pattern"), module, peft["lora_alpha"]))
        scales[path] = alpha / math.sqrt(r) if peft.get("use_rslora") else alpha / r
        weights[path] = (np.ascontiguousarray(a.T), np.ascontiguousarray(b.T))
    adapter = Adapter(name or src.resolve().name, config.base_id, weights, scales, float(peft["lora_alpha"]))
    adapter.validate(config, targeted)
    return adapter


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as float32 numpy."""
    import jax.numpy as jnp

    try:
        with _safetensors_open()(path, framework="flax") as f:
            return {k: np.asarray(jnp.asarray(f.get_tensor(k), jnp.float32)) for k in f.keys()}
    except Exception as e:   # safetensors raises its own error types for corrupt files
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e


def import_peft(src: str | Path, out: str | Path, config: LMMConfig, *, name: str | None = None,
                check_base: bool = True) -> Adapter:
    """Convert a PEFT LoRA directory into a valora adapter directory `out` (save_adapter), for
    the model `config`. Written beside `out` and renamed at the end: a failure leaves nothing
    at `out`, which must not exist or be an empty directory."""
    from valora_jax.checkpoint import atomic_directory, save_adapter

    out = Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output {out} already exists and is not an empty directory")
    adapter = read_peft(src, config, name=name, check_base=check_base)
    with atomic_directory(out) as tmp:
        save_adapter(tmp, adapter)
        (tmp / "peft_adapter_config.json").write_text(json.dumps(_read_json(Path(src) / "adapter_config.json"),
                                                                 indent=2))
    return adapter
