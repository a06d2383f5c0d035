"""DPO pairs/s, reference model included: our DPO step vs TRL ``DPOTrainer``, same run.

``python -m benchmarks.dpo_vs_trl`` (``--batch/--prompt/--response/--repeats``, ``--no-trl``).
Each pair is a random prompt of ``--prompt`` tokens and two random responses of ``--response``
tokens (the last one EOS), so every sequence is exactly ``prompt + response`` long (no padding
differences). Sigmoid DPO loss, beta 0.1, AdamW at a constant learning rate, clipping 1.0,
``--batch`` pairs per step, no gradient accumulation.

* Ours, per step: the reference log-probs of the batch (``models.sequence_logprob_sums`` of
  chosen and rejected in one pass, jitted once: the body of ``pipelines.dpo.reference_logps``,
  which
  the pipeline runs once up front; calling that function per step would re-jit it every call)
  and the pipeline's loss
  (``pipelines.dpo.make_dpo_loss``: chosen and rejected in one forward) through
  ``train.make_train_step``. Also reported: the step alone (``ours_step_only``), which is what
  the pipeline pays per step because it precomputes the reference once.
* TRL: ``DPOTrainer.train()`` with an explicit frozen reference model (a second copy of the
  checkpoint) run inside every step (``precompute_ref_log_probs=False``, its default),
  ``max_length = prompt + response``, timed per step by a callback.
"""

from __future__ import annotations

import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._common import emit
from benchmarks._vs_trl import (EOS_ID, PAD_ID, SMALL_LLAMA, hf_tokenizer, load_ours,
                                make_checkpoint, make_step_clock, parse_args, r, summarize,
                                time_ours, trl_common_args, versions, word_text, write_tokenizer)
from rlhf_jax.data import preference_batch
from rlhf_jax.models import sequence_logprob_sums
from rlhf_jax.pipelines.dpo import DPOAlgorithmConfig, make_dpo_loss
from rlhf_jax.train import create_train_state, make_optimizer, make_schedule, make_train_step
from rlhf_jax.train import OptimizerConfig

LR, BETA = 1e-5, 0.1


def make_pairs(n: int, prompt: int, response: int, vocab: int, seed: int = 0):
    """``n`` triples ``(prompt, chosen, rejected)`` of token-id lists, responses ending in EOS."""
    rng = np.random.default_rng(seed)

    def ids(k):
        return [int(x) for x in rng.integers(2, vocab, k)]

    return [(ids(prompt), ids(response - 1) + [EOS_ID], ids(response - 1) + [EOS_ID])
            for _ in range(n)]


def ours(model, params, pairs, batch: int, length: int, repeats: int, counter) -> dict:
    opt_cfg = OptimizerConfig(learning_rate=LR, schedule="constant", max_grad_norm=1.0)
    optimizer = make_optimizer(opt_cfg, 1000)
    step = make_train_step(make_dpo_loss(model, DPOAlgorithmConfig(loss="sigmoid", beta=BETA)),
                           optimizer, learning_rate=make_schedule(opt_cfg, 1000))
    ref_params = jax.tree.map(lambda x: x.copy(), params)  # frozen copy (the step donates)
    @jax.jit
    def ref_fn(p, pair):  # the body of pipelines.dpo.reference_logps: both sides in one pass
        both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), pair.chosen, pair.rejected)
        logps = sequence_logprob_sums(model, p, both)[0]
        return logps[:batch], logps[batch:]

    batches = [preference_batch(pairs[i:i + batch], length=length, pad_id=PAD_ID)
               for i in range(0, len(pairs) - batch + 1, batch)]
    box = {"state": create_train_state(params, optimizer, seed=0), "i": 0}

    def run(with_ref: bool):
        b = batches[box["i"] % len(batches)]
        box["i"] += 1
        if with_ref:
            ref_c, ref_r = ref_fn(ref_params, b)
        else:
            ref_c = ref_r = np.zeros(batch, np.float32)
        box["state"], m = step(box["state"], (b, ref_c, ref_r))
        m["loss"].block_until_ready()

    full = time_ours(lambda: run(True), repeats=repeats, counter=counter)
    step_only = time_ours(lambda: run(False), repeats=repeats, counter=counter)
    full["step_only"] = step_only
    full["step_cache_size"] = step._cache_size() + ref_fn._cache_size()
    return full


def theirs(ckpt: str, tok_dir: str, pairs, batch: int, length: int, repeats: int) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig as TRLDPOConfig, DPOTrainer

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype="float32")
    ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype="float32")
    # EOS is written as text: DPOTrainer appends eos_token to responses that lack it.
    ds = datasets.Dataset.from_dict({
        "prompt": [word_text(p) + " " for p, _, _ in pairs],
        "chosen": [word_text(c[:-1]) + "</s>" for _, c, _ in pairs],
        "rejected": [word_text(x[:-1]) + "</s>" for _, _, x in pairs]})
    clock = make_step_clock()
    with tempfile.TemporaryDirectory() as out:
        args = TRLDPOConfig(**trl_common_args(out, steps=1 + repeats, lr=LR, batch=batch),
                            max_length=length, loss_type=["sigmoid"], beta=BETA,
                            precompute_ref_log_probs=False, max_grad_norm=1.0)
        trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=ds,
                             processing_class=hf_tokenizer(tok_dir), callbacks=[clock])
        lens = {len(x["prompt_ids"]) + len(x["chosen_ids"]) for x in trainer.train_dataset}
        if lens != {length}:
            raise RuntimeError(f"TRL tokenised sequences of lengths {lens}, expected {length}")
        trainer.train()
    return clock.step_seconds()


def main(argv=None) -> dict:
    a, counter, has_trl = parse_args(__doc__, argv, batch=8, prompt=64, response=64, repeats=5)
    length = a.prompt + a.response
    pairs = make_pairs(a.batch * (a.repeats + 1), a.prompt, a.response,
                       SMALL_LLAMA["vocab_size"])
    with tempfile.TemporaryDirectory() as d:
        ckpt = make_checkpoint(f"{d}/policy") if has_trl else None
        model, params = load_ours(ckpt, heads=("lm",))
        mine = ours(model, params, pairs, a.batch, length, 2 * a.repeats + 1, counter)
        trl_res = None
        if has_trl:
            trl_res = theirs(ckpt, write_tokenizer(f"{d}/tok", SMALL_LLAMA["vocab_size"]),
                             pairs, a.batch, length, a.repeats)
    rec = {"benchmark": "dpo_vs_trl", "batch_pairs": a.batch, "prompt": a.prompt,
           "response": a.response, "params": model.config.num_params(), "target_ratio": 3.0,
           "ours_step_cache_size": mine["step_cache_size"]}
    rec |= summarize(mine, trl_res, unit="pairs/s", work=a.batch)
    so = mine["step_only"]
    rec |= {"ours_step_only": r(a.batch / so["median"], 1),
            "ours_breakdown_s": {"reference_logps": r(mine["median"] - so["median"]),
                                 "train_step": r(so["median"])}}
    if trl_res is not None:
        rec["ratio_step_only"] = r(trl_res["median"] / so["median"], 2)
    rec["versions"] = versions()
    return emit(rec)


if __name__ == "__main__":
    main()
