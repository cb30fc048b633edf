"""The bytes each token id stands for, so text markers can be found in already-tokenized sequences.

Searching for a marker's *token ids* inside a sequence is fragile: byte-level BPE merges whitespace
differently in context than alone ("\\n\\n" before a word splits, alone it is one token), and
SentencePiece adds a leading space. Searching the sequence's *bytes* and mapping byte offsets back
to token positions does not depend on how the marker happens to be split.
"""
from __future__ import annotations

import functools
import json
import weakref

import numpy as np


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    # The GPT-2 byte-to-unicode table used by every byte-level BPE: printable bytes map to themselves,
    # the others to code points from 256 upwards, in byte order.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[chr(b)] = b
        else:
            mapping[chr(256 + extra)] = b
            extra += 1
    return mapping


def _decoder_kind(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "generic"
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    text = json.dumps(decoder)
    if "ByteLevel" in text:
        return "byte_level"
    if "Metaspace" in text or "ByteFallback" in text or "\u2581" in text:
        return "sentencepiece"
    return "generic"


def _build_table(tokenizer) -> list[bytes]:
    kind = _decoder_kind(tokenizer)
    size = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    added = {str(t) for t in tokenizer.get_added_vocab()}
    byte_decoder = _byte_decoder()
    table: list[bytes] = []
    for tid, token in enumerate(tokens):
        if token is None:
            table.append(b"")
        elif token in added:
            table.append(token.encode("utf-8"))
        elif kind == "byte_level" and all(ch in byte_decoder for ch in token):
            table.append(bytes(byte_decoder[ch] for ch in token))
        elif kind == "sentencepiece":
            if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                table.append(bytes([int(token[3:5], 16)]))
            else:
                table.append(token.replace("\u2581", " ").encode("utf-8"))
        else:
            table.append(tokenizer.decode([tid], skip_special_tokens=False,
                                          clean_up_tokenization_spaces=False).encode("utf-8"))
    return table


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class TokenBytes:
    """Per-tokenizer table: ``table[id]`` is the bytes of token ``id``; ``lengths`` the same as a numpy array."""

    def __init__(self, table: list[bytes]):
        self.table = table
        self.lengths = np.fromiter((len(b) for b in table), dtype=np.int64, count=len(table))

    def spans(self, ids) -> tuple[bytes, np.ndarray, np.ndarray]:
        """``(bytes of the sequence, start offset of each token, end offset of each token)``."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.table)):
            raise ValueError(
                f"token id {int(ids.max() if ids.max() >= len(self.table) else ids.min())} is outside this "
                f"tokenizer's vocabulary of {len(self.table)}; the dataset was tokenized with another tokenizer"
            )
        ends = np.cumsum(self.lengths[ids]) if ids.size else np.zeros(0, dtype=np.int64)
        starts = ends - self.lengths[ids] if ids.size else ends
        data = b"".join([self.table[i] for i in ids.tolist()])
        return data, starts, ends


def token_bytes(tokenizer) -> TokenBytes:
    """The (cached) :class:`TokenBytes` of ``tokenizer``; rebuilt when the vocabulary grows."""
    hit = None
    try:
        hit = _CACHE.get(tokenizer)
    except TypeError:  # not weak-referenceable: no caching
        return TokenBytes(_build_table(tokenizer))
    if hit is None or len(hit.table) != len(tokenizer):
        hit = TokenBytes(_build_table(tokenizer))
        _CACHE[tokenizer] = hit
    return hit
