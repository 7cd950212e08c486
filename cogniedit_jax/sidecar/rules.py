"""Rule judges: plain functions with the VL judge's interface, registered by name (tests, and the demo's scene
checker, which knows what each synthetic edit should produce).

A rule is `fn(edited, source, instruction) -> scores` with images uint8 [H, W, 3] and scores either a dict of
the four 1-5 scores or an answer text in the judge's format; `JudgeParseError` from it marks the sample
invalid, like an unreadable VL answer. The sidecar takes `--rule-judge NAME`, or `--rule-judge module:NAME` to
import the module that registers NAME first.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import numpy as np

from cogniedit_jax.sidecar.judge import judge_result
from cogniedit_jax.sidecar.parsing import JudgeParseError, parse_judge_scores, validate_scores

_RULES: dict[str, Callable] = {}


def register_rule_judge(name: str, fn: Callable) -> Callable:
    if _RULES.get(name, fn) is not fn:
        raise ValueError(f"a different rule judge is already registered as {name!r}")
    _RULES[name] = fn
    return fn


def registered_rule_judges() -> list[str]:
    return sorted(_RULES)


class RuleJudge:
    def __init__(self, name: str, fn: Callable):
        self.fn, self.backend = fn, f"rule:{name}"

    def score(self, items: list[dict]) -> list[dict]:
        results = []
        for it in items:
            text = ""
            try:  # the rule itself may refuse (JudgeParseError): that sample is invalid, the batch goes on
                out = self.fn(it["edited"], it["source"], it["instruction"])
                text = out if isinstance(out, str) else repr(out)
                results.append(judge_result(text, 1, scores=parse_judge_scores(out) if isinstance(out, str)
                                            else validate_scores(out)))
            except JudgeParseError as e:
                results.append(judge_result(text, 1, error=str(e)))
        return results


def pixel_stats_rule(edited, source, instruction) -> dict:
    """A rule judge for smoke runs and tests, of pixels only: alignment grows with the edit's redness,
    consistency with its closeness to the source."""
    red = float(np.mean(edited[..., 0])) / 255
    change = float(np.mean(np.abs(edited.astype(np.float32) - source.astype(np.float32)))) / 255
    return {"alignment": 1 + 4 * red, "coherence": 3.0, "style": 3.0, "consistency": 5 - 4 * change}


register_rule_judge("pixel_stats", pixel_stats_rule)


def get_rule_judge(spec: str) -> RuleJudge:
    """The registered rule `NAME`, or `module:NAME` after importing `module` (which registers it)."""
    module, _, name = spec.rpartition(":")
    if module:
        importlib.import_module(module)
    if name not in _RULES:
        raise KeyError(f"no rule judge registered as {name!r}; registered: {registered_rule_judges() or 'none'}")
    return RuleJudge(name, _RULES[name])
