"""Fixtures shared across test modules."""

import jax
import pytest


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """A persistent compilation cache shared by the trainer tests (same tiny model); yields its dir."""
    from jax.experimental.compilation_cache import compilation_cache as cc
    values = {"jax_compilation_cache_dir": str(tmp_path_factory.getbasetemp() / "jax_cache"),
              "jax_persistent_cache_min_compile_time_secs": 0.0, "jax_persistent_cache_min_entry_size_bytes": 0}
    old = {name: getattr(jax.config, name) for name in values}
    for name, value in values.items():
        jax.config.update(name, value)
    cc.reset_cache()
    yield values["jax_compilation_cache_dir"]
    for name, value in old.items():
        jax.config.update(name, value)
    cc.reset_cache()
