"""Embedded tasks, generated in code from a seed (nothing is downloaded).

- ``preference_world``: a synthetic preference world with a hidden gold scorer and noisy
  Bradley-Terry annotators, for SFT -> reward model -> PPO/DPO, and the over-optimisation trap.
- ``arithmetic``: verifiable arithmetic problems for RL with verifiable rewards (GRPO).
"""
