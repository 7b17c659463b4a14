"""Orbax round trips of models and adapters, and the errors for bad checkpoints."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import micro_config
from valora_jax import (ModelRunner, TaskHead, init_model, load_adapter, load_model, random_adapter, save_adapter,
                        save_model)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, config):
    root = tmp_path_factory.mktemp("ckpt")
    model = init_model(config, seed=11)
    save_model(root / "model", model)
    runner = ModelRunner(model)
    adapter = random_adapter(config, runner.module_shapes, "counting", rank=8, seed=1)
    head = TaskHead(np.ones((config.text.hidden_size, 2), np.float32), np.array([0.5, -0.5], np.float32),
                    ("yes", "no"))
    adapter = dataclasses.replace(adapter, head=head)
    save_adapter(root / "adapter", adapter)
    return root, model, runner, adapter


def test_model_round_trip_is_exact(saved):
    root, model, _, _ = saved
    loaded = load_model(root / "model")
    assert loaded.config == model.config
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(loaded, nnx.Param))):
        np.testing.assert_array_equal(a, b)


def test_checkpoint_of_unfused_linears_loads_fused(saved, tmp_path):
    """A checkpoint written before q/k/v and gate/up were fused (each its own linear) loads into
    the fused layout with the same weights; one missing a part is refused, naming it."""
    import orbax.checkpoint as ocp

    from valora_jax.hf_model import fill_tree, flatten_tree
    from valora_jax.lora import fused_layout

    root, model, _, _ = saved
    layout = fused_layout(model)
    flat = dict(flatten_tree(nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    old = {p: v for p, v in flat.items() if p not in {f for f, _, _ in layout.values()}}
    old |= {p: np.asarray(flat[f])[..., s: s + w] for p, (f, s, w) in layout.items()}
    nested = {}
    for path, value in old.items():
        *parents, leaf = path.split(".")
        node = nested
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = value
    for name, tree in (("old", nested), ("broken", fill_tree(nested, old))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text((root / "model" / "config.json").read_text())
        if name == "broken":
            del tree["decoder"]["layers"]["1"]["up_proj"]
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save((tmp_path / name / "params").absolute(), tree)
    loaded = load_model(tmp_path / "old")
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(loaded, nnx.Param))):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"decoder\.layers\.1\.up_proj\.kernel.*missing"):
        load_model(tmp_path / "broken")


def test_adapter_round_trip(saved, config):
    root, _, runner, adapter = saved
    again = load_adapter(root / "adapter", config, runner.module_shapes)
    assert again.name == "counting" and again.scales == adapter.scales and again.alpha == adapter.alpha
    assert again.head.labels == ("yes", "no")
    np.testing.assert_array_equal(again.head.bias, adapter.head.bias)
    for p, (a, b) in adapter.weights.items():
        np.testing.assert_array_equal(again.weights[p][0], a)
        np.testing.assert_array_equal(again.weights[p][1], b)
    assert load_adapter(root / "adapter", config, runner.module_shapes, name="renamed").name == "renamed"


def test_adapter_for_another_base_model_is_refused(saved):
    root, _, runner, _ = saved
    other = dataclasses.replace(micro_config(), name="other-model")
    with pytest.raises(ValueError, match="other-model"):
        load_adapter(root / "adapter", other, runner.module_shapes)


def test_adapter_with_module_the_model_lacks_is_refused(saved, config):
    root, _, runner, _ = saved
    shapes = {p: s for p, s in runner.module_shapes.items() if "vision" not in p}
    with pytest.raises(ValueError, match="vision"):
        load_adapter(root / "adapter", config, shapes)


def test_corrupt_checkpoints_are_refused(saved, tmp_path, config):
    root, _, runner, _ = saved
    with pytest.raises(ValueError, match="adapter.json"):
        load_adapter(tmp_path, config, runner.module_shapes)
    (tmp_path / "adapter.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter.json"):
        load_adapter(tmp_path, config, runner.module_shapes)
    meta = json.loads((root / "adapter" / "adapter.json").read_text())
    meta["modules"][next(iter(meta["modules"]))]["rank"] = 3
    (tmp_path / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="weights"):      # no weights directory here
        load_adapter(tmp_path, config, runner.module_shapes)
    with pytest.raises(ValueError, match="config.json"):
        load_model(tmp_path)


@pytest.mark.parametrize("edit, message", [
    (lambda meta: meta.update(head_labels=["a", "b"]), r"names task-head labels \['a', 'b'\] but the weights hold no"),
    (lambda meta: meta["modules"][next(iter(meta["modules"]))].update(scale="NaN"), "scale nan is not a finite"),
    (lambda meta: meta["modules"][next(iter(meta["modules"]))].pop("scale"), "KeyError: 'scale'"),
    (lambda meta: meta.update(alpha=None), "TypeError"),
    (lambda meta: meta.update(modules=[1, 2]), "not a valid adapter description"),
], ids=["head-labels-without-head", "nan-scale", "no-scale", "alpha-null", "modules-a-list"])
def test_adapter_metadata_that_disagrees_with_its_tensors_is_a_value_error(tmp_path, config, edit, message):
    """adapter.json edited by hand: every disagreement with the weights or bad value is a
    ValueError naming it (a 400 when loaded over HTTP), never a KeyError or TypeError."""
    runner = ModelRunner(init_model(config, seed=11))
    save_adapter(tmp_path / "a", random_adapter(config, runner.module_shapes, "plain", rank=4, seed=2))
    meta = json.loads((tmp_path / "a" / "adapter.json").read_text())
    edit(meta)
    (tmp_path / "a" / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=message):
        load_adapter(tmp_path / "a", config, runner.module_shapes)
