"""Qwen-Image-Edit's condition encoder: prompt embeddings and mask exactly as diffusers 0.42.1's
`QwenImageEditPipeline` builds them from a source image and an instruction.

The pipeline's steps, each reproduced here and checked against the pipeline in the tests:
1. the source image is resized (Lanczos) to about 1024x1024 pixels at its aspect ratio, sides multiples of 32;
2. the instruction goes into the pipeline's chat template, whose user turn starts with the image;
3. the processor tokenizes the batch (padding to the longest) and turns the images into patches;
4. the model runs with input ids, mask, pixel values and grid sizes only, and the last hidden state (after the
   final norm) is kept;
5. each row keeps its unpadded tokens minus the first 64 (with the real vocabulary: the system turn and
   "<|im_start|>user\n", so the condition starts at the image tokens), and rows are zero-padded to the
   longest with a 0/1 int64 mask.

Step 4 passes no `mm_token_type_ids`, so with transformers 5 the model falls back to plain 1-D positions
instead of Qwen2.5-VL's 3-D (t, h, w) image positions. That is what the pipeline computes today, so it is the
default (`positions="pipeline"`); `positions="mrope"` passes them and gets Qwen2.5-VL's 3-D positions, as
transformers 4.x computed them for the same call.
"""

from __future__ import annotations

import logging

import numpy as np

from cogniedit_jax.data.buckets import TARGET_AREA, edit_dimensions, resize_to
from cogniedit_jax.sidecar.vl import VLModel, to_pil

log = logging.getLogger("cogniedit_jax.sidecar")

# QwenImageEditPipeline.prompt_template_encode and prompt_template_encode_start_idx (diffusers 0.42.1).
EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
TEMPLATE_DROP = 64
CONDITION_AREA = TARGET_AREA
POSITIONS = ("pipeline", "mrope")


def condition_image(image: np.ndarray, area: int = CONDITION_AREA):
    """The source image as the pipeline hands it to the processor: a PIL image, Lanczos-resized to the
    pipeline's ~1 MP edit size (`data.buckets`, equal to diffusers' `calculate_dimensions` and resize)."""
    pil = to_pil(image)
    return resize_to(pil, *edit_dimensions(pil.width, pil.height, area))


def template_prefix_tokens(tokenizer) -> int:
    """Tokens of the edit template before the image: the system turn and "<|im_start|>user\\n". With the real
    Qwen2 vocabulary these are exactly the 64 the pipeline drops, so the condition starts at the image."""
    return len(tokenizer(EDIT_TEMPLATE.split("<|vision_start|>")[0])["input_ids"])


def pad_embeddings(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad [L_i, D] rows to [B, max L, D] and the int64 mask [B, max L] (1 on real tokens)."""
    length = max(r.shape[0] for r in rows)
    embeds = np.zeros((len(rows), length, rows[0].shape[1]), dtype=rows[0].dtype)
    mask = np.zeros((len(rows), length), dtype=np.int64)
    for b, r in enumerate(rows):
        embeds[b, :r.shape[0]] = r
        mask[b, :r.shape[0]] = 1
    return embeds, mask


def _to_numpy(tensor) -> np.ndarray:
    import torch

    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.float().cpu().numpy().astype(ml_dtypes.bfloat16)  # exact: bf16 -> fp32 -> bf16
    return tensor.cpu().numpy()


class ConditionEncoder:
    def __init__(self, vl: VLModel, positions: str = "pipeline", area: int = CONDITION_AREA):
        if positions not in POSITIONS:
            raise ValueError(f"encoder positions {positions!r} is not one of {POSITIONS}")
        self.vl, self.positions, self.area = vl, positions, area
        n = template_prefix_tokens(vl.processor.tokenizer)
        if n != TEMPLATE_DROP:
            log.warning("the edit template's text before the image is %d tokens with this tokenizer; the pipeline "
                        "drops %d tokens regardless (right for the real Qwen2 vocabulary), and so do we", n,
                        TEMPLATE_DROP)

    def encode(self, images: list[np.ndarray], prompts: list[str]) -> list[np.ndarray]:
        """Per item, the condition embeddings [L_i, D] (model dtype) before padding; `pad_embeddings` of the
        list is the pipeline's (prompt_embeds, prompt_embeds_mask) with the mask always present."""
        import torch

        vl = self.vl
        texts = [EDIT_TEMPLATE.format(p) for p in prompts]
        with vl.lock, torch.inference_mode():
            inputs = vl.processor(text=texts, images=[condition_image(a, self.area) for a in images],
                                  padding=True, return_tensors="pt").to(vl.device)
            keys = ["input_ids", "attention_mask", "pixel_values", "image_grid_thw"]
            if self.positions == "mrope":
                keys.append("mm_token_type_ids")
            out = vl.model(**{k: inputs[k] for k in keys}, output_hidden_states=True)
            hidden = out.hidden_states[-1]
            mask = inputs["attention_mask"].bool()
            return [_to_numpy(hidden[b][mask[b]][TEMPLATE_DROP:]) for b in range(hidden.shape[0])]
