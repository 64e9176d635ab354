"""Turning a growing list of token ids into text deltas, and cutting them at stop strings.

Transformers' continuous batching manager has no stop strings, so the server does it: tokens are decoded
incrementally (a token may end in the middle of a UTF-8 character, and a byte-level BPE's text for a token
depends on its neighbours), and any tail of the text that could still become a stop string is held back, so no
character past a stop string ever reaches the client.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    """Decode only a small window around the new tokens, as vLLM and TGI do, instead of the whole sequence."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def push(self, new_tokens: list[int]) -> str:
        """Append tokens; return the text they complete (possibly empty while a character is unfinished)."""
        self.tokens.extend(new_tokens)
        prefix_text = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.tokens[self.prefix_offset :])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            delta = full_text[len(prefix_text) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.tokens)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is left at the end (an unfinished character comes out as U+FFFD, as in a full decode)."""
        prefix_text = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.tokens[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.tokens)
        return full_text[len(prefix_text) :] if len(full_text) > len(prefix_text) else ""


class StopMatcher:
    """Emit text up to (never past) the first stop string; hold back a tail that may still become one."""

    def __init__(self, stops: list[str] | tuple[str, ...] = ()):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buf = self.held + text
        first = -1
        for stop in self.stops:
            pos = buf.find(stop)
            if pos != -1 and (first == -1 or pos < first):
                first = pos
        if first != -1:
            self.stopped = True
            self.held = ""
            return buf[:first]
        keep = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buf)), keep, -1):
                if buf.endswith(stop[:k]):
                    keep = k
                    break
        self.held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """The held-back tail once generation ended without completing a stop string."""
        out, self.held = ("" if self.stopped else self.held), ""
        return out
