"""Benchmark scores from per-item records, aggregated exactly as each benchmark's reference script does, with
the items that have no score counted and listed instead of silently dropped.

A record (one line of the runner's items.jsonl) has `id`, `group`, `meta`, `status` ("ok", "judge_failed",
"unsupported", "source_error", "edit_error") and `scores` (None, or a dict whose values may be None where that
judge call failed).
"""

from __future__ import annotations

import collections
import math

from cogniedit_jax.eval.gedit import LANGUAGES, TASK_TYPES
from cogniedit_jax.eval.kris import GROUPS, KNOWLEDGE_TYPES, KP_GROUPS

GEDIT_METRICS = ("SC", "PQ", "O")
KRIS_METRICS = ("VC", "VQ", "IF", "KP")


def _mean(values) -> float | None:
    values = list(values)
    return math.fsum(values) / len(values) if values else None


def status_counts(records) -> dict:
    return dict(sorted(collections.Counter(r["status"] for r in records).items()))


def gedit_summary(records: list[dict]) -> dict:
    """{language: {"intersection" | "full": {"scores": {SC, PQ, O}, "per_task", "counts", "missing_task_types"}}}.

    Step1X-Edit GEdit-Bench calculate_statistics.py: per task type, the mean of the per-sample SC, PQ and O
    (O = sqrt(SC * PQ) per sample, not of the means); the reported figure is the plain mean of the per-task
    means (not the mean over samples), for each language, on the full set and on the rows with
    `Intersection_exist`. The reference skips samples it has no score for without a word; here they are
    counted by status, and a task type with no scored sample is named in `missing_task_types` (the mean is then
    over the other types, so such a figure is not comparable and the report says so)."""
    out = {}
    for lang in LANGUAGES:
        out[lang] = {}
        for subset in ("intersection", "full"):
            rows = [r for r in records if r["meta"]["language"] == lang
                    and (subset == "full" or r["meta"]["intersection"])]
            if not rows:
                continue
            per_task = {}
            for task in TASK_TYPES:
                scored = [r["scores"] for r in rows if r["group"] == task and r.get("scores")]
                per_task[task] = {"items": sum(r["group"] == task for r in rows), "scored": len(scored),
                                  **{m: _mean(s[m] for s in scored) for m in GEDIT_METRICS}}
            present = [t for t in TASK_TYPES if per_task[t]["scored"]]
            out[lang][subset] = {
                "scores": {m: _mean(per_task[t][m] for t in present) for m in GEDIT_METRICS},
                "per_task": per_task, "counts": status_counts(rows),
                "missing_task_types": [t for t in TASK_TYPES if t not in present]}
    return out


def kris_to_100(score: float) -> float:
    """KRIS-Bench's 0-100 scale: (s - 1) * 25 (summarize.py `normalize_score`)."""
    return (score - 1) * 25


def kris_summary(records: list[dict]) -> dict:
    """{"folders", "groups", "knowledge_types", "overall", "counts"} on 0-100, as the KRIS-Bench summary script
    (BAGEL eval/gen/kris/summarize.py `summarize_benchmark_scores_with_normalization`) computes them: every
    metric value is mapped to (s - 1) * 25; a folder's and a group's metric is the mean over its samples that
    have that metric (KP only in Social Science, Natural Science, Logical Reasoning); a group's AVG, a knowledge
    type's AVG and the overall AVG pool every individual metric value below them (not means of means); values
    that are missing (a failed judge call) are left out of exactly the means they would be in, and counted."""
    folders: dict = {}
    pooled: dict[str, dict[str, list[float]]] = {g: collections.defaultdict(list) for g in GROUPS}
    for group, names in GROUPS.items():
        metrics = KRIS_METRICS if group in KP_GROUPS else KRIS_METRICS[:3]
        for folder in names:
            rows = [r for r in records if r["group"] == folder]
            if not rows:
                continue
            values = {m: [kris_to_100(r["scores"][m]) for r in rows
                          if r.get("scores") and r["scores"].get(m) is not None] for m in metrics}
            for m, v in values.items():
                pooled[group][m] += v
            folders[folder] = {"group": group, **{m: _mean(v) for m, v in values.items()},
                               "counts": status_counts(rows), "scored": {m: len(v) for m, v in values.items()}}
    groups = {}
    for group, by_metric in pooled.items():
        flat = [v for m in KRIS_METRICS for v in by_metric.get(m, [])]
        if flat:
            groups[group] = {**{m: _mean(by_metric[m]) for m in KRIS_METRICS if by_metric.get(m)},
                             "AVG": _mean(flat)}
    flat_of = {g: [v for vs in pooled[g].values() for v in vs] for g in GROUPS}
    types = {t: {"AVG": _mean(v for g in gs for v in flat_of[g])} for t, gs in KNOWLEDGE_TYPES.items()
             if any(flat_of[g] for g in gs)}
    everything = [v for g in GROUPS for v in flat_of[g]]
    return {"folders": folders, "groups": groups, "knowledge_types": types,
            "overall": {"AVG": _mean(everything)}, "counts": status_counts(records)}
