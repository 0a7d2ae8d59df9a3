"""From a problem record to a model prompt, and from a model output to a runnable program.

Two modes, picked by whether the tokenizer has a chat template (override: `prompt.chat`), and for
chat models two prompt styles (`prompt.style`):
- chat (instruct models): the problem becomes one user message asking for a single ```python
  block; the program is the answer's code as domino.core.generation.code.extract_code reads it (the
  last python or untagged fenced block; an unterminated final block counts), the same code
  curation trains on, or the whole answer when it has no fenced block.
  For completion-style problems (HumanEval) the program is `prompt + "\n" + code`: when the model
  redefines the function this keeps the prompt's imports and helper functions (the redefinition
  wins), and when it wrote only the body the body continues the prompt's signature. This is what
  evalplus' sanitiser achieves for chat models.
  `prompt.style=evalplus` (the default; what EvalPlus, and so the Qwen2.5-Coder report's HumanEval
  figures, give an instruct model) asks for "a self-contained Python script" with the problem in a
  bare fence and opens the assistant's answer with EvalPlus' response prefix and a ```python
  fence: the model writes the program directly, decoding stops at the closing fence, and the
  program is what precedes it (for completion-style problems again `prompt + "\n" + code`). Other
  problems (stdin, starter code) keep the domino instruction under either style.
- base (plain completion): completion-style prompts are fed raw and the continuation is cut at
  the Codex stop sequences (a new top-level def/class/if/print/comment); other problems get the
  instruction followed by an opened ```python fence, and the program is what precedes the
  closing fence.
"""
from __future__ import annotations

from domino.core.generation.code import extract_code as answer_code
from domino.core.generation.code import sanitize

# Codex / human-eval stop sequences for completion-style generation of a function body
COMPLETION_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")
STYLES = ("evalplus", "domino")
# evalplus/provider/utility.py (instruction_prefix, response_prefix of `evalplus.codegen`)
EVALPLUS_INSTRUCTION = ("Please provide a self-contained Python script that solves the following problem in a "
                        "markdown code block:")
EVALPLUS_RESPONSE = ("Below is a Python script with a self-contained function that solves the problem and passes "
                     "corresponding tests:")
OPEN_FENCE = "```python\n"
CLOSE_FENCE = "```"


def opens_fence(problem: dict, chat: bool, style: str) -> bool:
    """Whether the prompt ends inside an opened ```python fence (the answer is the code itself)."""
    if style not in STYLES:
        raise ValueError(f"prompt.style={style!r} is not one of {STYLES}")
    return chat and style == "evalplus" and bool(problem.get("completion_style"))


def instruction(problem: dict) -> str:
    """The user message for chat models (and the body of base-model prompts for instruction tasks)."""
    if problem.get("completion_style"):
        return ("Complete the following Python function. Return the whole function, with the imports "
                "it needs, in a single ```python code block.\n\n```python\n" + problem["prompt"].rstrip()
                + "\n```")
    text = problem["prompt"].rstrip()
    if problem["test_type"] == "stdin":
        return (text + "\n\nWrite a Python 3 program that reads the input from standard input and "
                "writes the answer to standard output. Return the program in a single ```python code block.")
    if problem.get("starter_code"):
        return (text + "\n\nUse this starter code:\n```python\n" + problem["starter_code"].rstrip()
                + "\n```\nReturn the complete solution in a single ```python code block.")
    return text + "\n\nReturn the Python solution in a single ```python code block."


def build_prompt(problem: dict, tokenizer, chat: bool | None = None, style: str = "evalplus") -> str:
    """The exact text given to the model. `chat=None` means: chat iff the tokenizer has a template."""
    chat = use_chat(tokenizer, chat)
    if opens_fence(problem, chat, style):
        user = f"{EVALPLUS_INSTRUCTION}\n```\n{problem['prompt'].strip()}\n```\n"
        return (tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                              add_generation_prompt=True) + f"{EVALPLUS_RESPONSE}\n{OPEN_FENCE}")
    if chat:
        return tokenizer.apply_chat_template([{"role": "user", "content": instruction(problem)}],
                                             tokenize=False, add_generation_prompt=True)
    if problem.get("completion_style"):
        return problem["prompt"]
    return instruction(problem) + "\n\n```python\n"


def use_chat(tokenizer, chat: bool | None) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has_template:
        raise ValueError("prompt.chat=true but the tokenizer has no chat template")
    return has_template if chat is None else bool(chat)


def code_or_answer(text: str) -> str:
    """The python code of an answer (curation's rule, see domino.core.generation.code); the answer
    itself when it has no fenced block (a model that answers with bare code)."""
    code = answer_code(text, "python")
    return text if code is None else code


def truncate_at_stops(text: str, stops=COMPLETION_STOPS) -> str:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def to_program(problem: dict, output: str, chat: bool, style: str = "domino") -> str:
    """The program that is executed for one model output (`style`: the prompt's, see build_prompt).
    A chat answer to a completion-style problem is sanitised to the entry point and what it uses
    (generation.code.sanitize): the model's own example calls and asserts are never run."""
    if opens_fence(problem, chat, style):  # the output is the code, up to the closing fence if any
        code = output.split(CLOSE_FENCE)[0]
        return problem["prompt"] + "\n" + sanitize(code, problem.get("entry_point"))
    if chat:
        code = code_or_answer(output)
        if problem.get("completion_style"):
            return problem["prompt"] + "\n" + sanitize(code, problem.get("entry_point"))
        return code
    if problem.get("completion_style"):
        if "```" in output:  # a base model that answered in a fenced block anyway
            return problem["prompt"] + "\n" + code_or_answer(output)
        return problem["prompt"] + truncate_at_stops(output)
    return output.split("```")[0]


def program_from_sample(problem: dict, rec: dict, where: str) -> str:
    """`samples=` records: `solution` (whole program, evalplus style), `completion` (continuation
    of the prompt, human-eval style) or `output` (a raw chat answer, code extracted)."""
    if isinstance(rec.get("solution"), str):
        return rec["solution"]
    if isinstance(rec.get("completion"), str):
        c = rec["completion"]
        return problem["prompt"] + c if problem.get("completion_style") else c
    if isinstance(rec.get("output"), str):
        return to_program(problem, rec["output"], chat=True)
    raise ValueError(f"{where}: a sample needs a string field 'solution', 'completion' or 'output'")
