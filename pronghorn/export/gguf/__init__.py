"""GGUF writing: architecture metadata, tokenizer, tensor types, streaming writer."""
