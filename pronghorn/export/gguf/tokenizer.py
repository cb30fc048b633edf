"""Tokenizer metadata for GGUF: vocabulary, merges or scores, token types, special ids, chat template.

Two vocabulary kinds cover the supported families:

* byte-level BPE (Llama 3, Qwen 2/3, GPT-2 style) -> ``tokenizer.ggml.model = "gpt2"`` with merges and
  a pre-tokenizer name (``tokenizer.ggml.pre``) that tells llama.cpp which split regex to use. We find
  it by reading the regex from the tokenizer's own pre-tokenizer and looking it up in
  :data:`PRE_TOKENIZER_PATTERNS`; an unknown regex is an error, since llama.cpp would otherwise
  silently tokenize differently from training.
* SentencePiece (Llama 2, Mistral v0.x, Gemma, Phi-3) -> ``"llama"`` with per-piece scores and types,
  read from the ``.model`` file when the tokenizer has one, else derived from the fast tokenizer's
  BPE merges (a piece's score is minus the rank of the merge that creates it, which orders merges
  exactly as the merge list does).
"""
from __future__ import annotations

import dataclasses
import json
import os

import gguf

# Split regexes (as written in tokenizer.json files) -> llama.cpp pre-tokenizer names.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TEKKEN_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
                  r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_PATTERNS = {
    GPT2_PATTERN: "gpt-2",
    LLAMA3_PATTERN: "llama-bpe",
    QWEN2_PATTERN: "qwen2",
    TEKKEN_PATTERN: "tekken",
}


@dataclasses.dataclass
class GGUFVocab:
    """Everything :func:`write_tokenizer` puts in the file."""

    model: str                        # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    tokens: list[str]
    types: list[int]
    pre: str | None = None
    merges: list[str] | None = None
    scores: list[float] | None = None
    special_ids: dict[str, int] = dataclasses.field(default_factory=dict)
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None


def _backend_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise NotImplementedError(f"{type(tokenizer).__name__} has no `tokenizers` backend; GGUF export needs a "
                                  "fast tokenizer (AutoTokenizer.from_pretrained(..., use_fast=True))")
    return json.loads(backend.to_str())


def _split_patterns(pre: dict | None) -> list[tuple[str, dict]]:
    if not pre:
        return []
    if pre.get("type") == "Sequence":
        return [p for sub in pre["pretokenizers"] for p in _split_patterns(sub)]
    if pre.get("type") == "Split":
        pattern = pre["pattern"]
        return [(pattern.get("Regex") or pattern.get("String"), pre)]
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return [(GPT2_PATTERN, pre)]
    return []


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """The llama.cpp pre-tokenizer name for a byte-level BPE tokenizer's split regex."""
    patterns = [p for p, _ in _split_patterns(tokenizer_json.get("pre_tokenizer"))]
    if len(patterns) == 1 and patterns[0] in PRE_TOKENIZER_PATTERNS:
        return PRE_TOKENIZER_PATTERNS[patterns[0]]
    raise NotImplementedError(
        "this tokenizer's pre-tokenizer is not one llama.cpp is known to reproduce; its split regex "
        f"{patterns!r} matches none of {sorted(PRE_TOKENIZER_PATTERNS.values())}. Writing the GGUF anyway would "
        "make llama.cpp tokenize differently from training")


def _special_ids(tokenizer) -> dict[str, int]:
    out = {}
    for kind in ("bos", "eos", "unk", "pad"):
        value = getattr(tokenizer, f"{kind}_token_id", None)
        if isinstance(value, int):
            out[kind] = value
    return out


def _adds_bos_eos(tokenizer, special: dict[str, int]) -> tuple[bool, bool]:
    ids = tokenizer("a")["input_ids"]
    add_bos = "bos" in special and len(ids) > 0 and ids[0] == special["bos"]
    add_eos = "eos" in special and len(ids) > 0 and ids[-1] == special["eos"]
    return add_bos, add_eos


def _chat_template(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()))
    return template


def _vocab_list(tokenizer, vocab_size: int) -> list[str | None]:
    vocab = tokenizer.get_vocab()
    if len(vocab) and max(vocab.values()) >= vocab_size:
        raise ValueError(f"tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is {vocab_size}; "
                         "resize the model's embeddings (model.resize_token_embeddings(len(tokenizer)))")
    tokens: list[str | None] = [None] * vocab_size
    for piece, idx in vocab.items():
        tokens[idx] = piece
    return tokens


def _added_types(tokenizer) -> dict[int, int]:
    out = {}
    for idx, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        out[int(idx)] = int(gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED)
    return out


def _pad_unused(tokens: list[str | None], types: list[int]) -> list[str]:
    out = []
    for i, tok in enumerate(tokens):
        if tok is None:
            out.append(f"[PAD{i}]")
            types[i] = int(gguf.TokenType.UNUSED)
        else:
            out.append(tok)
    return out


def _bpe_vocab(tokenizer, data: dict, vocab_size: int) -> GGUFVocab:
    tokens = _vocab_list(tokenizer, vocab_size)
    types = [int(gguf.TokenType.NORMAL)] * vocab_size
    for idx, kind in _added_types(tokenizer).items():
        types[idx] = kind
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"].get("merges", [])]
    return GGUFVocab(model="gpt2", tokens=_pad_unused(tokens, types), types=types, merges=merges,
                     pre=pre_tokenizer_name(data))


def _adds_space_prefix(data: dict) -> bool:
    def walk(node):
        if not node:
            return False
        if node.get("type") == "Sequence":
            return any(walk(n) for n in node.get("normalizers", node.get("pretokenizers", [])))
        if node.get("type") == "Prepend":
            return node.get("prepend") == "\u2581"
        if node.get("type") == "Metaspace":
            return node.get("prepend_scheme", "always") != "never" and node.get("add_prefix_space", True)
        return False
    return walk(data.get("normalizer")) or walk(data.get("pre_tokenizer"))


def _spm_vocab_from_model_file(path: str, tokenizer, vocab_size: int) -> GGUFVocab:
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    proc = spm.SentencePieceProcessor(model_file=path)
    proto = pb.ModelProto()
    with open(path, "rb") as fh:
        proto.ParseFromString(fh.read())
    tokens: list[str | None] = [None] * vocab_size
    scores = [0.0] * vocab_size
    types = [int(gguf.TokenType.NORMAL)] * vocab_size
    for i in range(proc.get_piece_size()):
        tokens[i] = proc.id_to_piece(i)
        scores[i] = proc.get_score(i)
        if proc.is_unknown(i):
            types[i] = int(gguf.TokenType.UNKNOWN)
        elif proc.is_control(i):
            types[i] = int(gguf.TokenType.CONTROL)
        elif proc.is_unused(i):
            types[i] = int(gguf.TokenType.UNUSED)
        elif proc.is_byte(i):
            types[i] = int(gguf.TokenType.BYTE)
    for idx, kind in _added_types(tokenizer).items():
        if idx >= proc.get_piece_size():
            tokens[idx] = tokenizer.convert_ids_to_tokens(idx)
            types[idx] = kind
        elif types[idx] == int(gguf.TokenType.NORMAL):
            types[idx] = kind
    # The HF tokenizer's own normalizer decides the leading "▁" (Gemma's tokenizers do not add it even
    # when the .model says add_dummy_prefix); the training ids came from the HF tokenizer.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    prefix = (_adds_space_prefix(json.loads(backend.to_str())) if backend is not None
              else bool(proto.normalizer_spec.add_dummy_prefix))
    return GGUFVocab(model="llama", tokens=_pad_unused(tokens, types), types=types, scores=scores,
                     add_space_prefix=prefix)


def _spm_vocab_from_json(tokenizer, data: dict, vocab_size: int) -> GGUFVocab:
    tokens = _vocab_list(tokenizer, vocab_size)
    types = [int(gguf.TokenType.NORMAL)] * vocab_size
    scores = [0.0] * vocab_size
    index = {tok: i for i, tok in enumerate(tokens) if tok is not None}
    for rank, merge in enumerate(data["model"].get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        merged = index.get(left + right)
        if merged is not None and scores[merged] == 0.0:
            scores[merged] = -float(rank + 1)
    for i, tok in enumerate(tokens):
        if tok is not None and len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            types[i] = int(gguf.TokenType.BYTE)
    unk = data["model"].get("unk_token")
    if unk in index:
        types[index[unk]] = int(gguf.TokenType.UNKNOWN)
    for idx, kind in _added_types(tokenizer).items():
        if types[idx] != int(gguf.TokenType.UNKNOWN):
            types[idx] = kind
    return GGUFVocab(model="llama", tokens=_pad_unused(tokens, types), types=types, scores=scores,
                     add_space_prefix=_adds_space_prefix(data))


def _is_sentencepiece_style(data: dict) -> bool:
    model = data.get("model", {})
    return model.get("type") == "Unigram" or (model.get("type") == "BPE" and bool(model.get("byte_fallback")))


def build_vocab(tokenizer, vocab_size: int) -> GGUFVocab:
    """Read ``tokenizer`` into a :class:`GGUFVocab` padded to the model's ``vocab_size``."""
    vocab_file = getattr(tokenizer, "vocab_file", None)
    if isinstance(vocab_file, str) and vocab_file.endswith(".model") and os.path.isfile(vocab_file):
        vocab = _spm_vocab_from_model_file(vocab_file, tokenizer, vocab_size)
    else:
        data = _backend_json(tokenizer)
        if _is_sentencepiece_style(data):
            if data["model"]["type"] == "Unigram":
                raise NotImplementedError("Unigram SentencePiece tokenizers need their .model file for GGUF export; "
                                          "load the tokenizer from a folder that contains tokenizer.model")
            vocab = _spm_vocab_from_json(tokenizer, data, vocab_size)
        elif data.get("model", {}).get("type") == "BPE":
            vocab = _bpe_vocab(tokenizer, data, vocab_size)
        else:
            raise NotImplementedError(f"tokenizer model {data.get('model', {}).get('type')!r} is not supported for "
                                      "GGUF export; supported: byte-level BPE and SentencePiece BPE")
    vocab.special_ids = _special_ids(tokenizer)
    vocab.add_bos, vocab.add_eos = _adds_bos_eos(tokenizer, vocab.special_ids)
    vocab.chat_template = _chat_template(tokenizer)
    return vocab


def write_tokenizer(writer: gguf.GGUFWriter, vocab: GGUFVocab) -> None:
    """Add ``vocab`` to a GGUF writer under llama.cpp's ``tokenizer.ggml.*`` keys."""
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    elif vocab.model == "llama":
        writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    setters = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
               "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
    for kind, idx in vocab.special_ids.items():
        setters[kind](idx)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
