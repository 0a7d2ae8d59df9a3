"""Stage 6: an LLM grades each sample on a five-level rubric; samples below a threshold go.

Parsing is deliberately forgiving about form and strict about meaning: the verdict is the label
after the last "score"/"rating" marker, else the only label that occurs anywhere, else a lone
digit 1-5 after such a marker; anything else (no label, two different labels, empty output) is
`unknown`, counted in the report and kept or dropped by `keep_unknown`.
"""
from __future__ import annotations

import re

from domino.core.generation.chat import messages

LABELS = ("very poor", "poor", "average", "good", "excellent")
UNKNOWN = "unknown"
_LABEL_RE = re.compile(r"\b(very\s+poor|poor|average|good|excellent)\b", re.IGNORECASE)
_MARKER_RE = re.compile(r"(?:score|rating|grade|verdict)\s*[:=\-]?\s*\**\s*", re.IGNORECASE)


def _canon(label: str) -> str:
    return re.sub(r"\s+", " ", label.lower())


def parse_grade(output: str | None) -> str:
    if not output or not output.strip():
        return UNKNOWN
    text = output.strip()
    markers = list(_MARKER_RE.finditer(text))
    if markers:
        after = text[markers[-1].end():]
        m = _LABEL_RE.match(after.lstrip("*\"'` ([")) if after else None
        if m:
            return _canon(m.group(1))
        d = re.match(r"\s*\**\s*([1-5])(?:\s*/\s*5)?\b", after)
        if d:
            return LABELS[int(d.group(1)) - 1]
    found = {_canon(m.group(1)) for m in _LABEL_RE.finditer(text)}
    return found.pop() if len(found) == 1 else UNKNOWN


def build_conversation(text: str, criteria: str, template: str, system: str | None = None) -> list[dict]:
    return messages(template.format(text=text, criteria=criteria.strip(), labels=", ".join(LABELS)), system)


def keeps(grade: str, min_grade: str, keep_unknown: bool = False) -> bool:
    if min_grade not in LABELS:
        raise ValueError(f"judge.min_grade={min_grade!r}: expected one of {LABELS}")
    if grade == UNKNOWN:
        return keep_unknown
    return LABELS.index(grade) >= LABELS.index(min_grade)
