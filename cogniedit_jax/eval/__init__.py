"""Benchmark evaluation: GEdit-Bench and KRIS-Bench loaders, each benchmark's judge prompts and scoring rules,
the reference scripts' aggregation, the resumable edit/judge loop and the report
(`python -m cogniedit_jax.eval --help`)."""
