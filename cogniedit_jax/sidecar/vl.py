"""Loading a Qwen2.5-VL model and its processor from a local folder, and batched chat generation with images.

One `VLModel` may serve several roles (the judge, the decomposer and the encoder can be the same weights);
its lock serialises every use, because the model keeps state between calls (`rope_deltas`) and the device
runs one batch at a time anyway.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from pathlib import Path

import numpy as np

log = logging.getLogger("cogniedit_jax.sidecar")

IMAGE_BACKENDS = ("auto", "pil", "torchvision")


@dataclasses.dataclass
class VLModel:
    path: str
    model: object  # transformers.Qwen2_5_VLForConditionalGeneration
    processor: object  # a Qwen2-VL processor (text + images)
    image_backend: str  # "pil" or "torchvision": the two resize images differently
    device: str
    dtype: str
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


def resolve_layout(path) -> tuple[Path, Path]:
    """(model folder, processor folder): a diffusers Qwen-Image-Edit pipeline folder keeps them in
    `text_encoder/` and `processor/`; a transformers checkpoint holds both in one folder."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"model folder {root} does not exist")
    if (root / "model_index.json").exists():
        return root / "text_encoder", root / "processor"
    return root, root


def _image_only_processor_class():
    from transformers import Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        """Qwen2-VL's processor without the video processor, which needs torchvision (transformers builds a
        processor's parts from its __init__ signature, so dropping the argument drops the part)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return ImageOnlyQwen2VLProcessor


def _chat_template(folder: Path, tokenizer):
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").exists():
        return json.loads((folder / "chat_template.json").read_text())["chat_template"]
    return None


def load_processor(folder, image_backend: str = "auto"):
    """(processor, backend name). "auto" takes torchvision's image processor when torchvision imports and
    Pillow's otherwise; the two resize differently, so the choice is logged and reported by /health."""
    from transformers.utils import is_torchvision_available

    if image_backend not in IMAGE_BACKENDS:
        raise ValueError(f"image backend {image_backend!r} is not one of {IMAGE_BACKENDS}")
    folder = Path(folder)
    if image_backend == "auto":
        image_backend = "torchvision" if is_torchvision_available() else "pil"
    if image_backend == "torchvision":
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(folder), "torchvision"
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(folder)
    processor = _image_only_processor_class()(image_processor=Qwen2VLImageProcessorPil.from_pretrained(folder),
                                               tokenizer=tokenizer,
                                               chat_template=_chat_template(folder, tokenizer))
    return processor, "pil"


def resolve_device(device: str, dtype: str | None) -> tuple[str, str]:
    """"auto" picks CUDA when present; the dtype defaults to bf16 on GPU and fp32 on CPU."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return device, dtype or ("bfloat16" if device.startswith("cuda") else "float32")


def load_vl(path, device: str = "auto", dtype: str | None = None, image_backend: str = "auto") -> VLModel:
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    device, dtype = resolve_device(device, dtype)
    model_dir, processor_dir = resolve_layout(path)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model = model.to(device).eval()
    processor, backend = load_processor(processor_dir, image_backend)
    log.info("loaded %s on %s (%s), image backend %s (%s)", model_dir, device, dtype, backend,
             type(processor.image_processor).__name__)
    return VLModel(str(path), model, processor, backend, device, dtype)


def to_pil(array: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.asarray(array, dtype=np.uint8))


def generate(vl: VLModel, images: list[list[np.ndarray]], texts: list[str], max_new_tokens: int,
             sampling: dict | None = None, seed: int | None = None) -> list[str]:
    """One user turn per item (its images first, then its text) through the model's chat template; greedy
    unless `sampling` (generate() kwargs such as temperature) is given. Returns the decoded answers."""
    turns = [[{"image": a} for a in imgs] + [{"text": text}] for imgs, text in zip(images, texts, strict=True)]
    return generate_chat(vl, turns, max_new_tokens, sampling, seed)


def generate_chat(vl: VLModel, turns: list[list[dict]], max_new_tokens: int, sampling: dict | None = None,
                  seed: int | None = None) -> list[str]:
    """One user turn per item, its parts in the given order: `{"text": str}` or `{"image": uint8 [H, W, 3]}`
    (benchmark judges interleave captions and images). Greedy unless `sampling` is given."""
    import torch

    processor = vl.processor
    if not getattr(processor, "chat_template", None):
        raise ValueError(f"{vl.path} has no chat template (chat_template.jinja/.json or in tokenizer_config.json)")
    prompts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"} if "image" in part else {"type": "text", "text": part["text"]}
                                      for part in turn]}],
        add_generation_prompt=True, tokenize=False) for turn in turns]
    images = [to_pil(part["image"]) for turn in turns for part in turn if "image" in part]
    with vl.lock, torch.inference_mode():
        # Left padding: every row's answer then starts at the same column.
        inputs = processor(text=prompts, images=images or None, padding=True, padding_side="left",
                           return_tensors="pt").to(vl.device)
        if seed is not None:
            torch.manual_seed(seed)
        kwargs = {"do_sample": True, **sampling} if sampling else {"do_sample": False}
        out = vl.model.generate(**inputs, max_new_tokens=max_new_tokens, **kwargs)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
