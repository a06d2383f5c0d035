"""The only stateful package: train state, optimizer, jitted step, loop, checkpoints, sinks."""

from rlhf_jax.train.checkpoint import CheckpointError, Checkpointer
from rlhf_jax.train.loop import LoopConfig, NonFiniteError, train_loop
from rlhf_jax.train.onpolicy import (Forward, Models, OnPolicyAlgorithm, OnPolicyEngine,
                                     Rewards)
from rlhf_jax.train.optim import (SCHEDULES, OptimizerConfig, check_schedule, make_optimizer,
                                  make_schedule)
from rlhf_jax.train.rollout_eval import RolloutEval
from rlhf_jax.train.sinks import (JsonlSink, LoggingConfig, TensorBoardSink,
                                  read_jsonl_metrics)
from rlhf_jax.train.state import TrainState, create_train_state, state_shardings, step_key
from rlhf_jax.train.step import (accumulate, guarded_update, make_eval_step, make_train_step,
                                 merge_stacked_metrics, minibatch_updates)
from rlhf_jax.train.supervised import SupervisedTask, evaluate, fit

__all__ = [
    "TrainState", "create_train_state", "state_shardings", "step_key",
    "OptimizerConfig", "make_optimizer", "make_schedule", "check_schedule", "SCHEDULES",
    "make_train_step", "make_eval_step", "accumulate", "guarded_update",
    "merge_stacked_metrics", "minibatch_updates",
    "LoopConfig", "LoggingConfig", "train_loop", "NonFiniteError",
    "Checkpointer", "CheckpointError", "JsonlSink", "TensorBoardSink", "read_jsonl_metrics",
    "SupervisedTask", "fit", "evaluate",
    "Forward", "Models", "OnPolicyAlgorithm", "OnPolicyEngine", "Rewards", "RolloutEval",
]
