"""Thin integrations with TRL trainers: argument compatibility, loss path, optimizer groups, callbacks."""
