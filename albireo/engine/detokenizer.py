"""Incremental detokenization and stop-string handling for one request.

The frontend feeds the ids a request generates, a few at a time, to ``IncrementalDetokenizer.update``
and streams what ``take_delta`` hands back. Two things make this harder than decoding each new
token on its own:

* A character may be spread over several tokens: byte-level BPE (GPT-2 style) splits a multi-byte
  UTF-8 character into one token per byte, and SentencePiece-style models with ``byte_fallback``
  spell characters missing from the vocabulary as ``<0xE2>``-like byte tokens. Decoding such a
  token alone gives U+FFFD, so text is only released once the window decodes to something that
  does not end in U+FFFD.
* Some decoders depend on context: Llama's ``Strip(" ", 1, 0)`` removes the leading space of the
  first token only. Text is therefore computed as ``decode(window) - decode(window_prefix)`` over a
  short window of recent ids, so every token but the very first is decoded with a left neighbour,
  exactly as in ``tokenizer.decode(output_ids)``.

The target is ``tokenizer.decode(output_ids, skip_special_tokens=params.skip_special_tokens)``:
the deltas concatenate to that string (before stop-string truncation). The prompt is deliberately
*not* used as left context, because doing so would give the first generated token of a Metaspace
tokenizer a leading space that ``decode(output_ids)`` strips.

Two decoding paths produce the same text:

* ``tokenizers.decoders.DecodeStream`` (tokenizers >= 0.21), which runs the windowed decode in Rust;
* a Python version of the same prefix/read-offset scheme, used when the tokenizer has no Rust
  backend, when ``DecodeStream`` is missing, or from the first id on which ``DecodeStream`` raises
  (it raises "Invalid prefix" when a run of byte-fallback tokens turns out to be invalid UTF-8 and
  the ByteFallback decoder rewrites the whole run, including text already released, to U+FFFD).

Limits: for output that is not valid UTF-8 (a byte run that never completes) the streamed text is
best effort and can differ from a full decode, since ByteFallback replaces every byte of an invalid
run, even bytes of text already streamed. ``clean_up_tokenization_spaces`` (applied by transformers
only to non-BPE tokenizers that enable it) is not applied to streamed text.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tokenizers import Tokenizer

from albireo.sampling_params import SamplingParams

try:  # tokenizers >= 0.21
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover - depends on the installed tokenizers
    DecodeStream = None

_REPLACEMENT_CHAR = "\ufffd"


def _rust_tokenizer(tokenizer: Any) -> Any | None:
    """The ``tokenizers.Tokenizer`` behind a transformers fast tokenizer (or the tokenizer itself)."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    for name in ("backend_tokenizer", "_tokenizer"):
        backend = getattr(tokenizer, name, None)
        if isinstance(backend, Tokenizer):
            return backend
    return None


class IncrementalDetokenizer:
    """Turns a request's generated ids into text as they arrive, and watches for stop strings.

    ``update(ids)`` appends ids and returns the stop string it matched (``None`` otherwise);
    ``output_text`` is the text so far, cut at a matched stop string (kept if
    ``params.include_stop_str_in_output``); ``take_delta()`` returns the newly safe-to-stream text.
    After a stop string matched, or after ``take_delta(final=True)``, further ``update`` calls are
    ignored.

    ``use_decode_stream=False`` forces the pure-Python decoding path (both give the same text).
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int] | None,
        params: SamplingParams,
        *,
        use_decode_stream: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        # Kept for callers; not used as decoding context (see the module docstring).
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.skip_special_tokens = params.skip_special_tokens

        self.token_ids: list[int] = []  # every generated id fed so far
        self.stop_reason: str | None = None  # the stop string that ended the text, if any
        self.finished = False  # a stop string matched, or take_delta(final=True) was called

        self._backend = _rust_tokenizer(tokenizer)
        self._stream = None
        if use_decode_stream and DecodeStream is not None and self._backend is not None:
            self._stream = DecodeStream(skip_special_tokens=self.skip_special_tokens)
        # The window token_ids[_prefix_offset:] is decoded; text for token_ids[:_read_offset] has
        # been released. _prefix_offset trails by the ids of the last released chunk, which gives
        # the next token its left context. DecodeStream keeps the same window internally; the
        # offsets are tracked alongside it for the final flush and for a switch to the Python path.
        self._prefix_offset = 0
        self._read_offset = 0

        self._stops: tuple[str, ...] = tuple(params.stop)
        self._max_stop_len = max((len(s) for s in self._stops), default=0)
        self._pieces: list[str] = []  # output_text, joined lazily
        self._unsent: list[str] = []  # tail of output_text not yet returned by take_delta
        self._tail = ""  # last (max stop length - 1) characters, searched again with new text

    # ------------------------------------------------------------------ public interface

    @property
    def output_text(self) -> str:
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def update(self, new_token_ids: Iterable[int]) -> str | None:
        """Append generated ids; return the stop string matched by the new text, else ``None``."""
        if self.finished:
            return None
        ids = [int(t) for t in new_token_ids]
        if not ids:
            return None
        start = len(self.token_ids)
        self.token_ids.extend(ids)
        if self._stream is not None:
            new_text = self._step_stream(start)
        else:
            new_text = self._step_python()
        if not new_text:
            return None
        return self._append(new_text)

    def take_delta(self, final: bool = False) -> str:
        """Text appended since the previous call that is safe to stream.

        While the request runs, the longest suffix of ``output_text`` that is a prefix of a stop
        string is held back. After a stop string matched, or with ``final=True`` (which also
        flushes ids still waiting for the rest of a character), everything remaining is returned.
        """
        if final and not self.finished:
            self._flush()
            self.finished = True
        unsent = "".join(self._unsent)
        if self.finished:
            self._unsent = []
            return unsent
        cut = len(unsent) - self._stop_prefix_len(unsent)
        self._unsent = [unsent[cut:]] if cut < len(unsent) else []
        return unsent[:cut]

    # ------------------------------------------------------------------ decoding

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _release(self) -> None:
        """Mark everything fed so far as released and slide the window forward."""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.token_ids)

    def _step_stream(self, start: int) -> str:
        chunks = []
        for i in range(start, len(self.token_ids)):
            try:
                chunk = self._stream.step(self._backend, self.token_ids[i])
            except Exception:
                # Its window state is now unknown; continue in Python from the released offsets.
                self._stream = None
                return "".join(chunks) + self._step_python()
            if chunk is not None:
                chunks.append(chunk)
                self._prefix_offset = self._read_offset
                self._read_offset = i + 1
        return "".join(chunks)

    def _step_python(self) -> str:
        if self._read_offset == len(self.token_ids):
            return ""
        window = self.token_ids[self._prefix_offset :]
        prefix = self._decode(window[: self._read_offset - self._prefix_offset])
        text = self._decode(window)
        if len(text) <= len(prefix) or text.endswith(_REPLACEMENT_CHAR):
            return ""  # nothing new yet, or a character is still incomplete
        self._release()
        return text[len(prefix) :]

    def _flush(self) -> None:
        """Release ids still held for an incomplete character (they decode to U+FFFD)."""
        if self._read_offset == len(self.token_ids):
            return
        window = self.token_ids[self._prefix_offset :]
        prefix = self._decode(window[: self._read_offset - self._prefix_offset])
        text = self._decode(window)
        if text.startswith(prefix):
            new_text = text[len(prefix) :]
        else:  # ByteFallback rewrote released bytes of an invalid run; decode the rest alone
            new_text = self._decode(self.token_ids[self._read_offset :])
        self._release()
        if new_text:
            self._append(new_text)

    # ------------------------------------------------------------------ stop strings

    def _append(self, new_text: str) -> str | None:
        """Add released text, then look for a stop string that overlaps it."""
        self._pieces.append(new_text)
        self._unsent.append(new_text)
        if not self._stops:
            return None
        # Earlier text was searched already, so a new match must end inside new_text and start
        # at most (max stop length - 1) characters before it.
        window = self._tail + new_text
        best_at, best_stop = -1, None
        for stop in self._stops:
            at = window.find(stop)
            if at != -1 and (best_at == -1 or at < best_at):
                best_at, best_stop = at, stop
        if best_stop is None:
            keep = self._max_stop_len - 1
            self._tail = window[-keep:] if keep else ""
            return None
        end = best_at + len(best_stop) if self.params.include_stop_str_in_output else best_at
        self._truncate(len(window) - end)
        self.stop_reason = best_stop
        self.finished = True
        return best_stop

    def _truncate(self, drop: int) -> None:
        """Remove the last ``drop`` characters of output_text."""
        if drop <= 0:
            return
        text = self.output_text
        self._pieces = [text[: len(text) - drop]]
        # take_delta held back any suffix that could start a stop string, so the removed text
        # was never streamed and lies within _unsent.
        unsent = "".join(self._unsent)
        self._unsent = [unsent[: max(0, len(unsent) - drop)]]

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:k]):
                    best = k
                    break
        return best
