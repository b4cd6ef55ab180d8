"""A model's real tokenizer for the OpenAI executor (``worker --tokenizer PATH``), optional.

Without it, synthetic prompts are words that a real tokenizer counts at about one token each,
and a server that reports no ``usage`` is counted one token per streamed event. With it (a
Hugging Face ``tokenizer.json``, or a model directory holding one, read by the ``tokenizers``
library: ``pip install 'credit-router[tokenizer]'``), a turn given as ``input_tokens`` becomes a
prompt of exactly that many tokens for that model, and tokens the server does not report are
counted by the model's own rules. Nothing is downloaded: the file must be local.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from protocol.inference import synthetic_text

__all__ = ["Tokenizer", "TokenizerError"]

_ADJUST_ROUNDS: Final = 4


class TokenizerError(Exception):
    """The tokenizer could not be loaded (the message says why, in one line)."""


class Tokenizer:
    """Counts tokens and cuts text to a token count with one model's tokenizer.

    Args:
        path: a ``tokenizer.json`` file, or a directory that holds one.

    Raises:
        TokenizerError: ``tokenizers`` is not installed, or the file is missing or unreadable.
    """

    def __init__(self, path: str | Path) -> None:
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise TokenizerError(
                "--tokenizer needs the tokenizers library: pip install 'credit-router[tokenizer]'"
            ) from None
        file = Path(path)
        if file.is_dir():
            file = file / "tokenizer.json"
        if not file.is_file():
            raise TokenizerError(f"no tokenizer.json at {path}")
        try:
            self._tok: Any = HFTokenizer.from_file(str(file))
        except Exception as exc:  # the library raises plain Exceptions for a bad file
            raise TokenizerError(f"{file}: not a tokenizer.json ({exc})") from None
        self.path = file

    def __repr__(self) -> str:
        return f"<Tokenizer {self.path}>"

    def ids(self, text: str) -> list[int]:
        """``text``'s token ids, without special tokens."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def count(self, text: str) -> int:
        """Tokens in ``text`` (no special tokens)."""
        return len(self.ids(text)) if text else 0

    def text_of(
        self,
        tokens: int,
        *,
        seed: str = "",
        hash_ids: list[int] | None = None,
        block_tokens: int = 512,
    ) -> str:
        """A synthetic prompt of ``tokens`` tokens: ``synthetic_text``'s words (so the same
        ``hash_ids`` still share a prefix), cut at a token boundary.

        Decoding a cut and encoding it again can merge or split a token at the cut, so the cut
        moves until the re-encoded text has the count (a few rounds; the nearest count if a
        tokenizer never lands on it exactly).
        """
        if tokens <= 0:
            return ""
        words = synthetic_text(tokens, seed=seed, hash_ids=hash_ids, block_tokens=block_tokens)
        ids = self.ids(words)
        while len(ids) < tokens:  # a tokenizer that merges words: more words
            words += " " + synthetic_text(tokens, seed=f"{seed}/more{len(ids)}")
            ids = self.ids(words)
        cut = tokens
        text = self._tok.decode(ids[:cut])
        for _ in range(_ADJUST_ROUNDS):
            got = self.count(text)
            if got == tokens:
                break
            cut += tokens - got
            text = self._tok.decode(ids[: max(cut, 1)])
        return str(text)
