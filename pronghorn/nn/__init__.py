"""Hugging Face-compatible wrappers around pronghorn's kernels, for the model-wiring layer to bind.

Each module here holds functions with the signatures of the Hugging Face code they stand in for
(a norm module's ``forward``, ``apply_rotary_pos_emb``, ...). Import them from their modules, e.g.
``from pronghorn.nn.norms import rms_norm_forward``; this package imports nothing on its own.
"""
