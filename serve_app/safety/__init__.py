"""The safety stage: guard-model moderation of prompts and outputs, and the per-key policy that applies it."""
