"""GRPO for the edit policy: rollouts, advantages, the dense GRPO loss."""
