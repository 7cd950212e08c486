"""CogniEdit (dense GRPO + dynamic token focus) for Qwen-Image-Edit in JAX."""
