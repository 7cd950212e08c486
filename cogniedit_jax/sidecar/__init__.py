"""The PyTorch sidecar (judge, decomposer, condition encoder) and its client for the JAX side.

Importing this package imports neither torch nor transformers: the client side needs numpy only.
"""

from cogniedit_jax.sidecar.parsing import JudgeParseError, parse_judge_scores, reward_from_scores
from cogniedit_jax.sidecar.rules import register_rule_judge

__all__ = ["JudgeParseError", "parse_judge_scores", "register_rule_judge", "reward_from_scores"]
