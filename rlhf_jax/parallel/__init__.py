"""Device meshes and shardings (pure functions never name mesh axes; this package does)."""

from rlhf_jax.parallel.mesh import batch_sharding, data_parallel_mesh, replicated

__all__ = ["data_parallel_mesh", "batch_sharding", "replicated"]
