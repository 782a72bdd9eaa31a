"""Our tokenizers as `transformers.PreTrainedTokenizerFast`, so `AutoTokenizer` loads an exported model's
tokenizer and its ids are exactly ours (tested): byte-level as a 256-token byte-level BPE without merges,
char-level as a character vocabulary, BPE as the trained `tokenizers` JSON itself. Every one has a pad token
(BPE: `<|endoftext|>`; byte and char: `<|pad|>`, one id past the vocabulary), so batches can be padded."""

from __future__ import annotations

from ..data.bpe import EOT, BPETokenizer, _tokenizers
from ..data.tokenizers import ByteTokenizer, CharTokenizer
from ..errors import DynaformerError


def bytes_to_unicode() -> dict[int, str]:
    """The printable-character alphabet of byte-level BPE (GPT-2): printable Latin-1 bytes stand for
    themselves, the others for code points 256, 257, ... in byte order. `tokenizers`' ByteLevel uses it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _as_tokenizers_object(tok):
    tk = _tokenizers()
    if isinstance(tok, BPETokenizer):
        return tk.Tokenizer.from_str(tok.hf.to_str())
    if isinstance(tok, ByteTokenizer):
        vocab = {ch: b for b, ch in bytes_to_unicode().items()}
        hf = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=[]))
        hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.decoder = tk.decoders.ByteLevel()
        return hf
    if isinstance(tok, CharTokenizer):
        # A BPE model with no merges splits text into characters and looks each one up.
        hf = tk.Tokenizer(tk.models.BPE(vocab={c: i for i, c in enumerate(tok.chars)}, merges=[]))
        hf.decoder = tk.decoders.Fuse()
        return hf
    raise DynaformerError(f"export: no transformers tokenizer for tokenizer kind {getattr(tok, 'kind', tok)!r}")


def to_hf_tokenizer(tok, model_max_length: int | None = None):
    """A `PreTrainedTokenizerFast` with the same ids as `tok` (byte, char or BPE)."""
    from transformers import PreTrainedTokenizerFast

    kwargs = {}
    if isinstance(tok, BPETokenizer) and tok.eot_id is not None:
        kwargs.update(eos_token=EOT, bos_token=EOT, pad_token=EOT)  # GPT-2's convention: pad with end-of-text
    # Left padding: decoder-only generation appends after the prompt, so padding goes before it.
    hf = PreTrainedTokenizerFast(tokenizer_object=_as_tokenizers_object(tok), clean_up_tokenization_spaces=False,
                                 model_max_length=model_max_length or int(1e30), padding_side="left", **kwargs)
    if hf.pad_token is None:
        # Byte and char vocabularies have no spare id, and every id is a real character that a pad token (a special
        # token) would drop from decoded text. So padding gets its own id, one past the model's vocabulary: the
        # model never embeds it (padded positions are masked, their ids ignored; see Transformer.hidden).
        hf.add_special_tokens({"pad_token": PAD})
    return hf


PAD = "<|pad|>"


def from_hf_spec(spec: dict, vocab_size: int):
    """The inverse of `to_hf_tokenizer`: our tokenizer from an exported folder's tokenizer.json (a `tokenizers`
    JSON) and the model's vocabulary size. A merge-less BPE over characters (Fuse decoder) is the char tokenizer,
    one over the 256 byte symbols (ByteLevel) the byte tokenizer, anything else a BPE tokenizer as is; the pad
    token that byte and char exports add one past the vocabulary is left out."""
    model = spec.get("model") or {}
    vocab, merges = model.get("vocab"), model.get("merges")
    decoder = (spec.get("decoder") or {}).get("type")
    if model.get("type") == "BPE" and isinstance(vocab, dict) and not merges and len(vocab) == vocab_size:
        by_id = sorted(vocab.items(), key=lambda kv: kv[1])
        if [i for _, i in by_id] == list(range(vocab_size)):
            if decoder == "Fuse" and spec.get("pre_tokenizer") is None:
                return CharTokenizer([c for c, _ in by_id])
            if decoder == "ByteLevel" and vocab == {ch: b for b, ch in bytes_to_unicode().items()}:
                return ByteTokenizer()
    tok = BPETokenizer(spec)
    if tok.vocab_size != vocab_size:
        raise DynaformerError(f"tokenizer.json has {tok.vocab_size} tokens but the model's vocabulary has "
                              f"{vocab_size}: it is not the tokenizer this model was exported with")
    return tok
