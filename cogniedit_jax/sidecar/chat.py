"""Free-form chat with images, for callers that bring their own prompts and parse the answers themselves
(the benchmark judges of `cogniedit_jax.eval`, whose prompts and image layouts are fixed by each benchmark).

An item is `{"content": [{"text": str} | {"image": uint8 [H, W, 3]}, ...], "max_new_tokens": int,
"temperature": float | None, "top_p": float | None, "seed": int | None}`: one user turn with its parts in
order. Without a temperature the answer is greedy. Items with the same generation settings run as one batch.
"""

from __future__ import annotations

from cogniedit_jax.sidecar.protocol import ProtocolError, decode_image
from cogniedit_jax.sidecar.vl import VLModel, generate_chat

DEFAULT_MAX_NEW_TOKENS = 512


def parse_chat_item(item, max_image_pixels: int, max_new_tokens_limit: int, where: str) -> dict:
    """A request item checked and with its images decoded; raises `ProtocolError` naming the field."""
    if not isinstance(item, dict):
        raise ProtocolError(f"{where}: expected an object")
    content = item.get("content")
    if not isinstance(content, list) or not content:
        raise ProtocolError(f"{where}.content: expected a non-empty list of {{text}} / {{image}} parts")
    parts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if isinstance(part, dict) and set(part) == {"text"} and isinstance(part["text"], str):
            parts.append({"text": part["text"]})
        elif isinstance(part, dict) and set(part) == {"image"}:
            parts.append({"image": decode_image(part["image"], max_image_pixels, f"{at}.image")})
        else:
            raise ProtocolError(f"{at}: expected {{\"text\": str}} or {{\"image\": image}}")
    max_new = item.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    if isinstance(max_new, bool) or not isinstance(max_new, int) or not 1 <= max_new <= max_new_tokens_limit:
        raise ProtocolError(f"{where}.max_new_tokens: expected an integer in 1..{max_new_tokens_limit}, "
                            f"found {max_new!r}")
    settings = {}
    for key, kind in (("temperature", (int, float)), ("top_p", (int, float)), ("seed", int)):
        value = item.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
            raise ProtocolError(f"{where}.{key}: expected a number or null, found {value!r}")
        settings[key] = value
    return {"content": parts, "max_new_tokens": max_new, **settings}


class VLChat:
    def __init__(self, vl: VLModel):
        self.vl = vl

    def answer(self, items: list[dict]) -> list[dict]:
        """`{"text": answer}` per item, in order."""
        groups: dict[tuple, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault((it["max_new_tokens"], it["temperature"], it["top_p"], it["seed"]), []).append(i)
        out: list[dict] = [{}] * len(items)
        for (max_new, temperature, top_p, seed), indices in groups.items():
            sampling = None
            if temperature:
                sampling = {"temperature": temperature, **({"top_p": top_p} if top_p else {})}
            texts = generate_chat(self.vl, [items[i]["content"] for i in indices], max_new, sampling, seed)
            for i, text in zip(indices, texts, strict=True):
                out[i] = {"text": text}
        return out
