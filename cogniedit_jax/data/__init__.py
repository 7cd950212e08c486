"""Training data: the JSONL manifest, readers that build it (SEED-Data-Edit part 2, COCO 2017 green-mask
pairs, a plain folder), safe image loading, Qwen-Image-Edit resolution buckets, the resumable loader."""
