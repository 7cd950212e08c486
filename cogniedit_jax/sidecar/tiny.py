"""A tiny random Qwen2.5-VL checkpoint (model, byte-level BPE tokenizer, image processor, chat template) written
in the layout of a real one, so tests and the CPU demo run the sidecar through the same loading path.

    python -m cogniedit_jax.sidecar.tiny OUT_DIR

Built offline: the tokenizer is trained here with `tokenizers` on a few sentences; weights are random.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# Qwen2.5-VL's special tokens (the ones the processor, the chat template and the edit pipeline's template use).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]

# Qwen2-VL's chat format for text and images (a compact equivalent of the template real checkpoints ship).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "Describe the key features of the input image (color, shape, size, texture, objects, background).",
    "Alignment Score (1-5): 4 Coherence Score (1-5): 3 Style Score (1-5): 5 Consistency Score (1-5): 2",
    "<info>a red square on a white table</info> <think>the user wants blue</think>",
    "<answer>Make the red square blue.</answer> <object>the square</object>",
    "Change the car to a sports car. Replace the sky with a sunset scene. Add a green mask to the dog.",
]


def tiny_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer (Qwen2's kind) with Qwen2.5-VL's special tokens, as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   padding_side="right", chat_template=CHAT_TEMPLATE)


def tiny_config(tokenizer, hidden: int = 32):
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = {"vocab_size": len(tokenizer), "hidden_size": hidden, "intermediate_size": 2 * hidden,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "max_position_embeddings": 4096,
            # head_dim 16: the 3D RoPE sections (t, h, w) split its 8 frequencies.
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"]}
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": hidden,
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
              "fullatt_block_indexes": [1]}
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def write_tiny_checkpoint(out_dir, seed: int = 0, max_pixels: int = 12845056, tokenizer_dir=None) -> Path:
    """Save a random tiny `Qwen2_5_VLForConditionalGeneration`, its tokenizer, image-processor config (the
    real checkpoint's pixel bounds by default) and chat template into `out_dir`; returns the folder.
    `tokenizer_dir`: use that tokenizer (e.g. the real Qwen2 vocabulary) instead of the tiny trained one."""
    import torch
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    from cogniedit_jax.bench.reference import randomize_

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        tokenizer = tiny_tokenizer()
    else:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, padding_side="right")
        tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    model = randomize_(Qwen2_5_VLForConditionalGeneration(tiny_config(tokenizer)), seed).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=max_pixels, patch_size=14, merge_size=2,
                             temporal_patch_size=2).save_pretrained(out)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", help="a tokenizer folder to use instead of the tiny one")
    args = parser.parse_args(argv)
    print(write_tiny_checkpoint(args.out_dir, args.seed, tokenizer_dir=args.tokenizer))


if __name__ == "__main__":
    main()
