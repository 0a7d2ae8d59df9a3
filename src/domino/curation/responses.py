"""Stage 7 (responses) and the code extraction stage 8 relies on: the model writes a solution,
reasoning first, then the code in one fenced block; the code is the last fenced block."""
from __future__ import annotations

import re

_FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def build_conversation(text: str, template: str, system: str | None = None) -> list[dict]:
    user = template.format(text=text)
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def extract_code(response: str | None, language: str | None = None) -> str | None:
    """The last fenced block (preferring blocks tagged `language`, or untagged ones, when a
    language is given); an unterminated last fence counts up to the end of the text (a response
    cut at max_new_tokens). None when there is no fenced block."""
    if not response:
        return None
    blocks = [(tag.lower(), body) for tag, body in _FENCE.findall(response)]
    if language:
        lang = language.lower()
        wanted = [b for t, b in blocks if t in ("", lang, {"python": "py"}.get(lang, lang))]
        blocks = [("", b) for b in wanted] or blocks
    for _, body in reversed(blocks):
        if body.strip():
            return body.strip("\n")
    return None
