"""Text from anywhere made fit for one line: a failure reason for Cumulocity or a child, a
detail in a log line. The one sanitizer every layer uses."""

from __future__ import annotations

import re

MAX_REASON_CHARS = 500
# C0 controls, DEL and C1 controls: they break lines, terminals and SmartREST records.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def one_line(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """Control characters and runs of whitespace folded into one space, at most `limit`
    characters (the last one an ellipsis when the text was cut)."""
    folded = " ".join(_CONTROL.sub(" ", text).split())
    if len(folded) > limit:
        folded = folded[: limit - 1].rstrip() + "…"
    return folded
