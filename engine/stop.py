"""Stop sequences: end a generation at the first occurrence of any of a few strings.

The model produces text in chunks, and a stop string may span several of them. A StopMatcher is fed
each chunk and returns only the text that can no longer turn out to be part of a stop string: it
holds back the longest tail that is the start of one, releases it when the next chunk shows it is
not, and drops it when the match completes. So a streaming reader never sees text that the final
response does not hold, and the stop string itself is never emitted.
"""

from __future__ import annotations

from collections.abc import Iterable


class StopMatcher:
    """Feed text chunks; get back what is safe to emit. `matched` is the stop string once one occurred."""

    def __init__(self, stops: Iterable[str]):
        self.stops = tuple(stops)
        self.matched: str | None = None
        self._held = ""  # the tail that might still begin a stop string

    def feed(self, text: str, final: bool = False) -> str:
        """The part of held + text that is final; '' once a stop string has matched.

        final: no more text follows, so nothing is held back (a partial stop string is just text).
        """
        if self.matched is not None:
            return ""
        buffer = self._held + text
        # The earliest occurrence wins: the response ends where the first stop string starts.
        found = [(index, stop) for stop in self.stops if (index := buffer.find(stop)) != -1]
        if found:
            index, self.matched = min(found)
            self._held = ""
            return buffer[:index]
        keep = 0 if final else self._partial_tail(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep]

    def _partial_tail(self, buffer: str) -> int:
        """Length of the longest tail of buffer that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if stop.startswith(buffer[-length:]):
                    longest = length
                    break
        return longest
