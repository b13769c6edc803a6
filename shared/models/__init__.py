"""The student's models: resolving a name to a folder, tiny test models, loading, generation."""
