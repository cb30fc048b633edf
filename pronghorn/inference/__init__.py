"""Generation helpers."""
