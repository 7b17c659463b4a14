"""Shared fixtures: a micro LMM (fast to compile on CPU), its runner, pool and adapters."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from serve.generate import Generator
from tests.oracle import reference_completion
from valora_jax import AdapterPool, ModelRunner, VisionConfig, init_model, random_adapter, tiny
from valora_jax.config import ALL_TARGETS, TextConfig

pytest_plugins = ["tests.skip_guard", "pytester"]

# The CLI turns on JAX's persistent compilation cache for the whole process once a test calls it;
# in-process tests run without it (never the user's ~/.cache, which other runs may be writing).
# test_server's `valora serve` subprocesses use a cache of their own.
os.environ["VALORA_XLA_CACHE"] = "off"


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_executables():
    """Drop JAX's compiled executables after each test module: every one maps JIT code into the
    process, and a whole suite's worth approaches the kernel's limit on memory mappings
    (vm.max_map_count, 65530 here), past which XLA's CPU compiler crashes."""
    yield
    jax.clear_caches()

# How closely two computations of the same function must agree, keyed by dtype:
# elementwise (rtol, atol), and `rel`, the bound on ||a - b|| / ||b||.
TOLERANCES = {jnp.dtype(jnp.float32): {"rtol": 1e-4, "atol": 1e-4, "rel": 1e-5},
              jnp.dtype(jnp.bfloat16): {"rtol": 2e-2, "atol": 2e-2, "rel": 2e-2}}


def tol(dtype) -> dict:
    """Elementwise tolerances for np.testing.assert_allclose."""
    t = TOLERANCES[jnp.dtype(dtype)]
    return {"rtol": t["rtol"], "atol": t["atol"]}


def assert_rel_close(a, b, dtype) -> None:
    """||a - b|| / ||b|| within the dtype's bound (for whole tensors such as logits)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = np.linalg.norm(a - b) / np.linalg.norm(b)
    assert err <= TOLERANCES[jnp.dtype(dtype)]["rel"], f"relative error {err:.3g} for {jnp.dtype(dtype)}"


def micro_config(dtype: str = "float32", targets=ALL_TARGETS, max_loras: int = 4, max_rank: int = 16):
    """tiny() shrunk further: 2 decoder layers, 32x32 images (16 patches)."""
    base = tiny(targets=tuple(targets), max_loras=max_loras, max_rank=max_rank)
    return dataclasses.replace(
        base, dtype=dtype,
        vision=VisionConfig(image_size=32, patch_size=8, hidden_size=64, num_layers=2, num_heads=2,
                            mlp_size=128, feature_layer=-2),
        text=TextConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_size=128, max_position=512),
        page_size=8)


@pytest.fixture(scope="session")
def config():
    return micro_config()


@pytest.fixture(scope="session")
def runner(config):
    return ModelRunner(init_model(config, seed=1))


@pytest.fixture(scope="session")
def adapters(config, runner):
    """Three adapters of ranks 4, 8, 16 on every target (vision and projector included)."""
    return [random_adapter(config, runner.module_shapes, f"task{i}", r, seed=10 + i, std=0.2)
            for i, r in enumerate((4, 8, 16))]


@pytest.fixture(scope="session")
def generator(config, runner, adapters):
    pool = AdapterPool(config, runner.module_shapes, runner.write_slot)
    for a in adapters:
        pool.register(a)
    return Generator(runner, pool, num_pages=128)


@pytest.fixture(scope="session")
def oracle(runner, generator):
    """oracle(request) -> its Completion by full recomputation (tests/oracle.py), on the runner's
    base weights and the generator's pool's current version of its adapter."""
    pool = generator.pool
    return lambda request: reference_completion(runner.model(), request.adapter and pool.get(request.adapter),
                                                request, generator.tokenizer)


def random_image(seed: int, size: int = 40) -> np.ndarray:
    return (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)
