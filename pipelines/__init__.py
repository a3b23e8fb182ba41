"""End-to-end recipes. Run from the repository root: `python -m pipelines.demo`."""
