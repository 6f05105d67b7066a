"""SentencePiece-style vocabularies from GGUF (`tokenizer.ggml.model == "llama"`, e.g. Gemma).

llama.cpp tokenizes these by repeatedly merging the adjacent pair of pieces whose
concatenation is in the vocabulary with the highest score, falling back to <0xXX> byte
tokens for characters the vocabulary lacks. That is BPE whose merge ranks follow the
merged piece's score, so it is built as a `tokenizers` BPE: every split (left, right)
of every piece whose halves are both pieces becomes a merge, ranked by the piece's
score. Spaces become "▁" (with a leading one when `add_space_prefix` is set); control
and user-defined tokens are matched verbatim in the raw text first, as llama.cpp does.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

_NORMAL, _CONTROL, _USER_DEFINED, _BYTE = 1, 3, 4, 6


def _merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (_NORMAL, _USER_DEFINED)}
    ranked = []
    for piece, pid in vocab.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                # Higher score merges first; equal scores keep vocabulary order.
                ranked.append((-scores[pid], pid, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build(tokens: list[str], scores: list[float], types: list[int], *, add_space_prefix: bool,
          unk_token: str | None) -> Tokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_merges(tokens, scores, types), unk_token=unk_token,
                               byte_fallback=True, fuse_unk=True))
    steps = [normalizers.Prepend("▁")] if add_space_prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _USER_DEFINED])
    return tok
