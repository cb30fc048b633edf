"""Extending a model's context with RoPE scaling when max_seq_length exceeds what it was trained on."""
from __future__ import annotations

import logging
import math

logger = logging.getLogger(__name__)


def _rope_params(config) -> dict:
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        # per-layer-type parameters (e.g. Gemma 3: full_attention / sliding_attention); scale the full ones
        return params.get("full_attention", next(iter(params.values())))
    return dict(params or {})


def apply_rope_scaling(config, max_seq_length: int, rope_scaling: dict | None = None) -> dict | None:
    """Set RoPE scaling on ``config`` in place; return the parameters applied (None if unchanged).

    An explicit ``rope_scaling`` dict wins. Otherwise a ``max_seq_length`` beyond
    ``max_position_embeddings`` gets linear scaling by the (rounded-up) ratio; models already using
    a scaled RoPE (llama3, yarn, ...) have that factor multiplied instead.
    """
    trained = getattr(config, "max_position_embeddings", None)
    params = _rope_params(config)
    if rope_scaling is not None:
        if not isinstance(rope_scaling, dict) or not ("rope_type" in rope_scaling or "type" in rope_scaling):
            raise ValueError(f"rope_scaling must be a dict with a 'rope_type' key (e.g. {{'rope_type': 'linear', "
                             f"'factor': 2.0}}), got {rope_scaling!r}")
        new = {**params, **rope_scaling}
        new.setdefault("rope_type", new.pop("type", "default"))
    elif trained and max_seq_length > trained:
        factor = float(math.ceil(max_seq_length / trained))
        rope_type = params.get("rope_type", "default")
        if rope_type in ("default", "linear", "dynamic"):
            new = {**params, "rope_type": "linear", "factor": factor * float(params.get("factor", 1.0))}
        else:
            new = {**params, "factor": float(params.get("factor", 1.0)) * factor}
        logger.warning("max_seq_length=%d exceeds the model's trained context of %d tokens: applying %s RoPE "
                       "scaling with factor %.1f", max_seq_length, trained, new["rope_type"], new["factor"])
        config.max_position_embeddings = max_seq_length
    else:
        return None
    _set_rope_params(config, new)
    return new


def _set_rope_params(config, new: dict) -> None:
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        params = dict(params)
        params["full_attention"] = new
        config.rope_parameters = params
    else:
        config.rope_parameters = new
