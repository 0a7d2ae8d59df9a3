"""Stage 7 (responses) and the code extraction stage 8 relies on: the model writes a solution,
reasoning first, then the code in one fenced block. The code is read by
domino.core.generation.code.extract_code, the rule evaluation scores answers with, so the code a
model is trained on is extracted exactly as the code it is scored on."""
from __future__ import annotations

from domino.core.generation.chat import messages
from domino.core.generation.code import extract_code

__all__ = ["build_conversation", "extract_code"]


def build_conversation(text: str, template: str, system: str | None = None) -> list[dict]:
    return messages(template.format(text=text), system)
