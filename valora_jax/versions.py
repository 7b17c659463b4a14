"""The software stack a process runs on: what `valora info` prints and every benchmark records."""

import importlib.metadata
import platform

_CUDA_PLUGINS = ("jax-cuda13-plugin", "jax-cuda12-plugin")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def stack_versions() -> dict[str, str]:
    """{"python", "jax", "jaxlib", "flax", "cuda_plugin", "backend", "device"}: installed versions
    ("none" where absent; cuda_plugin names the plugin, e.g. "jax-cuda13-plugin 0.11.2"), JAX's
    default backend and its first device's kind. Initialises JAX's backends."""
    import jax

    plugins = [f"{p} {v}" for p in _CUDA_PLUGINS if (v := _version(p)) is not None]
    return {"python": platform.python_version(),
            **{p: _version(p) or "none" for p in ("jax", "jaxlib", "flax")},
            "cuda_plugin": ", ".join(plugins) or "none",
            "backend": jax.default_backend(), "device": jax.devices()[0].device_kind}


def versions_line(record: dict) -> str:
    """The versions a record names (stack_versions' keys; older records name only jax) as one line,
    e.g. "jax 0.11.2, jaxlib 0.11.2, flax 0.12.10, cuda plugin jax-cuda13-plugin 0.11.2, Python 3.12.3"."""
    names = {"jax": "jax", "jaxlib": "jaxlib", "flax": "flax", "cuda_plugin": "cuda plugin", "python": "Python"}
    return ", ".join(f"{name} {record[key]}" for key, name in names.items() if key in record)
