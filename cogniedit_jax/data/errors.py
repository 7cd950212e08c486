"""Bad input is reported, never fatal: every reader and loader raises `DataError` for one item and the long
running caller (manifest builder, `prepare`, the training loader) records it in a `SkipLog` and goes on."""

from __future__ import annotations

import collections
import dataclasses


class DataError(Exception):
    """One bad item. `where` names the file (and line: `path:line`); `kind` is a short stable category for
    counting: missing, corrupt, truncated, too_large, bad_mode, bad_line, bad_field, empty_instruction, ..."""

    def __init__(self, where: str, kind: str, message: str):
        super().__init__(f"{where}: {message}")
        self.where = str(where)
        self.kind = kind
        self.message = message


@dataclasses.dataclass
class SkipLog:
    """Skipped items: counts per kind plus the first `keep` messages (a 50k-line data set with a systematic
    fault must not keep 50k strings)."""

    keep: int = 100
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    messages: list = dataclasses.field(default_factory=list)

    def add(self, err: DataError) -> None:
        self.counts[err.kind] += 1
        if len(self.messages) < self.keep:
            self.messages.append(str(err))

    def merge(self, other: "SkipLog") -> None:
        for kind, n in other.counts.items():
            self.counts[kind] += n
        self.messages.extend(other.messages[: max(0, self.keep - len(self.messages))])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "skipped 0 items"
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(self.counts.items()))
        shown = "\n".join(f"  {m}" for m in self.messages)
        more = self.total - len(self.messages)
        tail = f"\n  ... and {more} more" if more > 0 else ""
        return f"skipped {self.total} items ({kinds}):\n{shown}{tail}"
