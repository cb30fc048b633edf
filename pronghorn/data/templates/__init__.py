"""Chat-template registry and the built-in templates, one module per model family."""

# Stands for the tokenizer's EOS text in Ollama templates of formats that end turns with the tokenizer's
# own EOS (Ollama's template data has no such variable); the export layer substitutes it.
OLLAMA_EOS = "<[EOS_TOKEN]>"
