"""Chat-template registry and the built-in templates, one module per model family."""
