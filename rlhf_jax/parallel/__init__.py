"""Device meshes and shardings (pure functions never name mesh axes; this package does)."""

from rlhf_jax.parallel.config import AXES, MeshConfig, make_mesh
from rlhf_jax.parallel.mesh import batch_sharding, data_parallel_mesh, replicated
from rlhf_jax.parallel.rules import (FAMILY_RULES, RULES, Rule, ShardingPlan, batch_spec,
                                     opt_state_shardings, param_shardings, path_str,
                                     plan_param_specs, shard_params)

__all__ = [
    "data_parallel_mesh", "batch_sharding", "replicated",
    "AXES", "MeshConfig", "make_mesh",
    "Rule", "RULES", "FAMILY_RULES", "ShardingPlan", "plan_param_specs", "param_shardings",
    "batch_spec", "shard_params", "opt_state_shardings", "path_str",
]
