"""Test session setup: 8 fake CPU devices and a persistent compilation cache.

Both must be set before jax is imported anywhere, which is why they live here.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get("HVLA_TEST_JAX_CACHE", os.path.expanduser("~/.cache/hvla/jax_test_cache")),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
