"""SFT tokens/s: our jitted train step vs TRL ``SFTTrainer``, same checkpoint and data, same run.

``python -m benchmarks.sft_vs_trl`` (``--batch/--seq/--repeats``, ``--no-trl``). Rows of
``--seq`` random tokens (no padding), next-token NLL on every position (token mean), AdamW at a
constant learning rate with global-norm clipping 1.0, batch ``--batch``, no gradient
accumulation. Ours is the SFT pipeline's own loss (``token_batch_logprobs`` + ``sft_loss``)
through ``train.make_train_step`` with ``train.make_optimizer``. TRL's is ``SFTTrainer.train()``
on the same rows pre-tokenised (``input_ids``), timed per step by a callback. Tokens/s counts
the ``batch * (seq - 1)`` predicted tokens.
"""

from __future__ import annotations

import tempfile

import numpy as np

from benchmarks._common import emit
from benchmarks._vs_trl import (SMALL_LLAMA, hf_tokenizer, load_ours, make_checkpoint,
                                make_step_clock, parse_args, summarize, time_ours, trl_common_args,
                                versions, write_tokenizer)
from rlhf_jax.data import pad_token_batch
from rlhf_jax.losses import sft_loss
from rlhf_jax.models import token_batch_logprobs
from rlhf_jax.train import (OptimizerConfig, create_train_state, make_optimizer, make_schedule,
                            make_train_step)

LR = 1e-5


def rows(n: int, seq: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(2, vocab, (n, seq)).astype(np.int32)


def ours(model, params, data: np.ndarray, batch: int, repeats: int, counter) -> dict:
    """The SFT pipeline's loss and step (``pipelines/sft.py``), one fresh batch per call."""
    def loss_fn(p, b, key):
        return sft_loss(token_batch_logprobs(model, p, b), b.loss_mask, aggregation="token_mean")

    opt_cfg = OptimizerConfig(learning_rate=LR, schedule="constant",
                              max_grad_norm=1.0)
    optimizer = make_optimizer(opt_cfg, 1000)
    step = make_train_step(loss_fn, optimizer, learning_rate=make_schedule(opt_cfg, 1000))
    seq = data.shape[1]
    batches = [pad_token_batch([(r, [1] * seq) for r in data[i:i + batch]], length=seq, pad_id=0)
               for i in range(0, len(data) - batch + 1, batch)]
    box = {"state": create_train_state(params, optimizer, seed=0), "i": 0}

    def run():
        box["state"], m = step(box["state"], batches[box["i"] % len(batches)])
        box["i"] += 1
        m["loss"].block_until_ready()

    out = time_ours(run, repeats=repeats, counter=counter)
    out["step_cache_size"] = step._cache_size()
    return out


def theirs(ckpt: str, tok_dir: str, data: np.ndarray, batch: int, repeats: int) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype="float32")
    ds = datasets.Dataset.from_dict({"input_ids": [list(map(int, r)) for r in data]})
    clock = make_step_clock()
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(**trl_common_args(out, steps=1 + repeats, lr=LR, batch=batch),
                         max_length=data.shape[1], packing=False, padding_free=False,
                         completion_only_loss=False, max_grad_norm=1.0,
                         dataset_num_proc=None)
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds,
                             processing_class=hf_tokenizer(tok_dir), callbacks=[clock])
        trainer.train()
    res = clock.step_seconds()
    res["optim"] = str(args.optim)
    return res


def main(argv=None) -> dict:
    a, counter, has_trl = parse_args(__doc__, argv, batch=8, seq=256, repeats=5)
    data = rows(a.batch * (a.repeats + 1), a.seq, SMALL_LLAMA["vocab_size"])
    with tempfile.TemporaryDirectory() as d:
        ckpt = make_checkpoint(f"{d}/policy") if has_trl else None
        model, params = load_ours(ckpt, heads=("lm",))
        mine = ours(model, params, data, a.batch, a.repeats, counter)
        trl_res = None
        if has_trl:
            trl_res = theirs(ckpt, write_tokenizer(f"{d}/tok", SMALL_LLAMA["vocab_size"]), data,
                             a.batch, a.repeats)
    tokens = a.batch * (a.seq - 1)
    rec = {"benchmark": "sft_vs_trl", "batch": a.batch, "seq": a.seq,
           "params": model.config.num_params(), "target_ratio": 1.5,
           "ours_step_cache_size": mine["step_cache_size"]}
    rec |= summarize(mine, trl_res, unit="tokens/s", work=tokens)
    if trl_res is not None:
        rec["trl_optim"] = trl_res["optim"]
    rec["versions"] = versions()
    return emit(rec)


if __name__ == "__main__":
    main()
