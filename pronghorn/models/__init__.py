"""Model loading, per-family specs and reversible fast-path patching."""
