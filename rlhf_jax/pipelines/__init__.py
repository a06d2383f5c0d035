"""The RLHF stages, one per module, each a frozen config dataclass plus ``run(cfg)``.

==============  =====================  ==================================================
module          config                 what it does
==============  =====================  ==================================================
sft             SFTConfig              masked NLL on prompt/completion or messages data
reward_model    RewardModelConfig      Bradley–Terry reward model on preference pairs
ppo             PPOConfig              PPO + GAE against a reward model, KL to a reference
grpo            GRPOConfig             GRPO / Dr.GRPO / DAPO / RLOO / REINFORCE++ (VARIANTS)
dpo             DPOConfig              DPO, cDPO, robust DPO, IPO, SimPO, ORPO (LOSSES)
distill         DistillConfig          student matches the teacher's token distributions
best_of_n       BestOfNConfig          sample N, keep the reward model's best as SFT data
==============  =====================  ==================================================

The configs compose the blocks of ``pipelines.config`` (re-exported here). The supervised
stages share ``pipelines.supervised`` (``train.supervised.fit``); PPO and the GRPO family are
algorithm definitions run by ``pipelines.onpolicy`` on ``train.OnPolicyEngine``.

Import a stage's module for its ``run`` (``from rlhf_jax.pipelines import sft``); importing
this package loads none of them.
"""

from rlhf_jax.parallel import MeshConfig
from rlhf_jax.pipelines.config import (DataConfig, GenerationConfig, KLConfig, ModelSpec,
                                       OnPolicyConfig, OverlapConfig, RewardConfig,
                                       SupervisedConfig)
from rlhf_jax.train import LoggingConfig, LoopConfig, OptimizerConfig

__all__ = ["DataConfig", "GenerationConfig", "KLConfig", "LoggingConfig", "LoopConfig",
           "MeshConfig", "ModelSpec", "OnPolicyConfig", "OptimizerConfig", "OverlapConfig",
           "RewardConfig", "SupervisedConfig"]
