"""The judge's and the decomposer's prompt templates, shipped as package data in `templates/`.

A template file starts with documentation lines ("# ..."), which are not sent, followed by the prompt with
one placeholder (`{caption}` or `{instruction}`), replaced verbatim so that braces elsewhere are harmless.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

PLACEHOLDERS = {"judge": "{caption}", "decomposer": "{instruction}"}


def load_template(name: str, path=None) -> str:
    """The prompt of template `name` ("judge" or "decomposer"), from `path` when given (a user's own
    file in the same format), else the packaged one."""
    if name not in PLACEHOLDERS:
        raise ValueError(f"unknown template {name!r}; expected one of {sorted(PLACEHOLDERS)}")
    if path is None:
        text = resources.files("cogniedit_jax.sidecar").joinpath("templates", f"{name}.txt").read_text()
        where = f"packaged template {name}.txt"
    else:
        text, where = Path(path).read_text(), str(path)
    lines = text.splitlines(keepends=True)
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    prompt = "".join(lines).strip("\n")
    if prompt.count(PLACEHOLDERS[name]) != 1:
        raise ValueError(f"{where}: the prompt must contain {PLACEHOLDERS[name]} exactly once")
    return prompt


def fill(template: str, name: str, value: str) -> str:
    return template.replace(PLACEHOLDERS[name], value)
