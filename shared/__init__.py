"""LlamaDuo: migrate a task from a service LLM to a small local model, automatically."""

__version__ = "0.1.0"
