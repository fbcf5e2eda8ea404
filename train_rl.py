"""GRPO with the paper's batch-level reward on FSDP2 (Cell-o1's second stage). Not written yet: issue 6 fills it.

It will hold, readable top to bottom: draw prompts -> rollouts with `sampler.Sampler` on the current weights (synced
by `train_sft.sync_weights` every step) -> `reward.score` -> group advantages -> clipped policy loss with a k3 KL to
the frozen start model over micro-batches -> one optimizer step per rollout batch -> metrics, evaluation and atomic
checkpoints, with the launch, model, data and checkpoint conventions of train_sft.py. Reference recipe (notes, section
4.2): n=5 samples per prompt, 64 prompts per step, temperature 1.0, lr 1e-6, clip 0.2, KL coefficient 0.001, entropy 0,
token-mean loss.
"""
