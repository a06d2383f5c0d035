"""The only stateful package: train state, optimizer, jitted step, loop, checkpoints, sinks."""

from rlhf_jax.train.checkpoint import Checkpointer
from rlhf_jax.train.loop import LoopConfig, NonFiniteError, train_loop
from rlhf_jax.train.optim import SCHEDULES, OptimizerConfig, make_optimizer, make_schedule
from rlhf_jax.train.sinks import JsonlSink, TensorBoardSink, read_jsonl_metrics
from rlhf_jax.train.state import TrainState, create_train_state, state_shardings, step_key
from rlhf_jax.train.step import (accumulate, guarded_update, make_eval_step, make_train_step,
                                 merge_stacked_metrics, minibatch_updates)

__all__ = [
    "TrainState", "create_train_state", "state_shardings", "step_key",
    "OptimizerConfig", "make_optimizer", "make_schedule", "SCHEDULES",
    "make_train_step", "make_eval_step", "accumulate", "guarded_update",
    "merge_stacked_metrics", "minibatch_updates",
    "LoopConfig", "train_loop", "NonFiniteError",
    "Checkpointer", "JsonlSink", "TensorBoardSink", "read_jsonl_metrics",
]
