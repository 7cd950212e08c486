"""The reward judge: a Qwen2.5-VL model scoring an edit against its source and instruction (paper section
10.1). The first answer is greedy; an answer `parse_judge_scores` cannot read is asked again with sampling,
up to `retries` times, and after that the sample is reported invalid: it is never given a default score.

A judge (this one or a rule judge, `rules.py`) maps items `{"edited", "source", "instruction"}` (images uint8
[H, W, 3]) to one result each: `{"valid", "scores", "attempts", "text", "error"}`.
"""

from __future__ import annotations

from collections.abc import Callable

from cogniedit_jax.sidecar.parsing import JudgeParseError, parse_judge_scores
from cogniedit_jax.sidecar.prompts import fill, load_template
from cogniedit_jax.sidecar.vl import VLModel, generate


def judge_result(text: str, attempts: int, scores: dict | None = None, error: str | None = None) -> dict:
    return {"valid": scores is not None, "scores": scores, "attempts": attempts, "text": text, "error": error}


def score_with_retries(answer: Callable[[list[int], int], list[str]], n: int, retries: int,
                       parse: Callable[[str], dict] = parse_judge_scores) -> list[dict]:
    """Ask `answer(indices, attempt)` for the items still without an answer `parse` can read (it raises
    `JudgeParseError` otherwise), at most 1 + `retries` times; attempt 0 is the greedy one. Each result records
    the attempts it took and its last answer."""
    results: list[dict] = [{}] * n
    pending = list(range(n))
    for attempt in range(retries + 1):
        if not pending:
            break
        failed = []
        for i, text in zip(pending, answer(pending, attempt)):
            try:
                results[i] = judge_result(text, attempt + 1, scores=parse(text))
            except JudgeParseError as e:
                results[i] = judge_result(text, attempt + 1, error=str(e))
                failed.append(i)
        pending = failed
    return results


class VLJudge:
    def __init__(self, vl: VLModel, template_path=None, max_new_tokens: int = 512, retries: int = 2,
                 temperature: float = 0.7, top_p: float = 0.9, seed: int = 0):
        self.vl, self.max_new_tokens, self.retries, self.seed = vl, max_new_tokens, retries, seed
        self.template = load_template("judge", template_path)
        self.sampling = {"temperature": temperature, "top_p": top_p}
        self.backend = "vl"

    def score(self, items: list[dict]) -> list[dict]:
        def answer(indices, attempt):
            sub = [items[i] for i in indices]
            return generate(self.vl, [[it["edited"], it["source"]] for it in sub],
                            [fill(self.template, "judge", it["instruction"]) for it in sub], self.max_new_tokens,
                            sampling=self.sampling if attempt else None, seed=self.seed + attempt if attempt else None)

        return score_with_retries(answer, len(items), self.retries)
