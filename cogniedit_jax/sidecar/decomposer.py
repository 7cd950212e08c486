"""The instruction decomposer: an MLLM (paper: PeBR-R1-7B, a Qwen2.5-VL model) rewrites an instruction into
`<info> <think> <answer> <object>` given the source image (paper sections 8.1, 9). Greedy decoding; the
parser keeps the original instruction when the answer part is missing, and says so (`fallback`)."""

from __future__ import annotations

from cogniedit_jax.sidecar.parsing import parse_decomposition
from cogniedit_jax.sidecar.prompts import fill, load_template
from cogniedit_jax.sidecar.vl import VLModel, generate


class VLDecomposer:
    def __init__(self, vl: VLModel, template_path=None, max_new_tokens: int = 1024):
        self.vl, self.max_new_tokens = vl, max_new_tokens
        self.template = load_template("decomposer", template_path)

    def decompose(self, items: list[dict]) -> list[dict]:
        """Items `{"image", "instruction"}` -> the parsed parts, the raw answer under "text"."""
        answers = generate(self.vl, [[it["image"]] for it in items],
                           [fill(self.template, "decomposer", it["instruction"]) for it in items],
                           self.max_new_tokens)
        return [{**parse_decomposition(a, it["instruction"]).to_json(), "text": a} for a, it in zip(answers, items)]
