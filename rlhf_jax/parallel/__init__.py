"""Device meshes and shardings (pure functions never name mesh axes; this package does)."""

from rlhf_jax.parallel.config import AXES, MeshConfig, make_mesh, parse_mesh
from rlhf_jax.parallel.distributed import initialize_distributed
from rlhf_jax.parallel.mesh import data_parallel_mesh
from rlhf_jax.parallel.placement import (barrier, batch_axes, batch_sharding,
                                         batch_size_divisor, fetch, from_main,
                                         is_main_process, put, replicated)
from rlhf_jax.parallel.rules import (FAMILY_RULES, MOE_RULES, RULES, Rule, ShardingPlan, batch_spec,
                                     opt_state_shardings, param_shardings, path_str,
                                     plan_param_specs, shard_params)

__all__ = [
    "data_parallel_mesh", "batch_sharding", "replicated", "batch_axes", "batch_size_divisor",
    "put", "fetch", "from_main", "barrier", "is_main_process", "initialize_distributed",
    "AXES", "MeshConfig", "make_mesh", "parse_mesh",
    "Rule", "RULES", "MOE_RULES", "FAMILY_RULES", "ShardingPlan", "plan_param_specs",
    "param_shardings", "batch_spec", "shard_params", "opt_state_shardings", "path_str",
]
