"""The benchmarks ' own logic (their figures come from running them, never from tests)."""
