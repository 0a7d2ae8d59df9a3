"""The code in a model's answer: one rule for the code curation trains on and the code evaluation
scores (curation.responses and evaluation.prompting both call `extract_code`).

The answer's fenced blocks are read in order; a block's tag (```python, ```cpp, bare ```) is
matched case-insensitively. With a `language`, blocks tagged with it (or an alias: python, py,
python3) or untagged are preferred, other blocks are used only when there is none. The last
preferred block that is not blank wins: models explain first and answer last, and often follow
the answer with a sample output block. A final fence that is never closed (an answer cut at
max_new_tokens) runs to the end of the text.
"""
from __future__ import annotations

import re

# a fence: ``` + optional tag + newline; the body ends at the next ``` or at the end of the text
_FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[ \t]*\n(.*?)(```|\Z)", re.DOTALL)
_ALIASES = {"python": ("python", "py", "python3", "py3"), "py": ("python", "py", "python3", "py3")}


def fenced_blocks(text: str) -> list[tuple[str, str, bool]]:
    """(tag lowercased, body, closed) for every fenced block, in order. A closed block's body
    loses the blank lines around it (the newline before the closing fence belongs to the fence);
    an unclosed block keeps its text up to the end, as generated."""
    out = []
    for tag, body, end in _FENCE.findall(text):
        closed = end == "```"
        body = body.lstrip("\n")
        out.append((tag.lower(), body.rstrip("\n") if closed else body, closed))
    return out


def extract_code(text: str | None, language: str | None = None) -> str | None:
    """The code of an answer (see the module docstring); None when it has no non-blank fenced block."""
    if not text:
        return None
    blocks = fenced_blocks(text)
    if language:
        lang = language.lower()
        tags = ("",) + _ALIASES.get(lang, (lang,))
        blocks = [b for b in blocks if b[0] in tags] or blocks
    for _, body, _ in reversed(blocks):
        if body.strip():
            return body
    return None


def _top_level(tree) -> tuple[dict, set[str]]:
    """(name -> the top-level def, class or assignment that defines it, the names imports bind)
    of a module: a function or class defined twice is its last definition (what runs), a name
    assigned twice its first assignment."""
    import ast
    defs: dict[str, ast.stmt] = {}
    imported: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defs[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        defs.setdefault(n.id, node)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            imported |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return defs, imported


def sanitize(code: str, entry_point: str | None) -> str:
    """The part of `code` a function-level test can see: every import, and the top-level
    functions, classes and assignments that `entry_point` reaches through the names it uses; the
    rest (example calls, prints, the model's own asserts, `if __name__` blocks) is dropped, as
    EvalPlus' sanitiser does for chat answers. Code that does not parse is cut to its longest
    parsing prefix of lines first; without `entry_point` (or when it is not defined) the parsed
    code is returned whole."""
    import ast
    lines = code.splitlines()
    tree = None
    for end in range(len(lines), 0, -1):
        try:
            tree = ast.parse("\n".join(lines[:end]))
            lines = lines[:end]
            break
        except SyntaxError:
            continue
    if tree is None:
        return code
    src = "\n".join(lines)
    defs, _ = _top_level(tree)
    if not entry_point or entry_point not in defs:
        return src
    keep: set[int] = set()
    todo = [entry_point]
    while todo:
        node = defs.get(todo.pop())
        if node is None or id(node) in keep:
            continue
        keep.add(id(node))
        todo += [n.id for n in ast.walk(node) if isinstance(n, ast.Name)]
    out = [ast.get_source_segment(src, node, padded=True) for node in tree.body
           if isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in keep]
    return "\n\n".join(s for s in out if s) + "\n"


# a top-level line that starts these may still be part of the solution: it is never where it ends
_SOLUTION_GOES_ON = ("def ", "async ", "class ", "@", "import ", "from ", "```")


def solution_end(code: str, entry_point: str) -> int | None:
    """Where the part of `code` that `sanitize(code, entry_point)` keeps has ended, or None: the
    offset of the first complete top-level line that does not start a def, class, decorator or
    import (the model's own example calls, prints, asserts, comments) and before which the code
    parses, defines `entry_point`, and resolves every global name the entry point reaches (to a
    top-level def, class or assignment, an import, or a builtin). Evaluation stops decoding there
    (`prompt.stop_after_solution`): what follows is dropped by `sanitize` unless it redefines a
    name the entry point reaches or adds an import, which a model's tests rarely do
    (bench/stop_after_solution.py measures it on saved completions)."""
    pos = 0
    while (nl := code.find("\n", pos)) >= 0:
        line = code[pos:nl]
        if line.strip() and line[0] not in " \t" and not line.startswith(_SOLUTION_GOES_ON) \
                and _resolves(code[:pos], entry_point):
            return pos
        pos = nl + 1
    return None


def _resolves(code: str, entry_point: str) -> bool:
    """Whether `code` parses, defines `entry_point`, and every global name the entry point reaches
    (through functions, classes and assignments, as `sanitize` follows them) is defined there,
    imported or a builtin. Names are read from the symbol table: a function's parameters and
    locals are not globals; decorators, defaults and base classes run at the top level."""
    import ast
    import builtins
    import symtable
    try:
        tree = ast.parse(code)
        table = symtable.symtable(code, "<solution>", "exec")
    except (SyntaxError, ValueError):
        return False
    defs, imported = _top_level(tree)
    if entry_point not in defs:
        return False
    scopes: dict[str, list] = {}
    for child in table.get_children():
        scopes.setdefault(child.get_name(), []).append(child)

    def globals_of(t) -> set[str]:
        names = {s.get_name() for s in t.get_symbols() if s.is_referenced() and s.is_global()}
        for child in t.get_children():
            names |= globals_of(child)
        return names

    seen: set[str] = set()
    todo = [entry_point]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        node = defs.get(name)
        if node is None:
            if name in imported or hasattr(builtins, name):
                continue
            return False
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            todo += [n.id for n in ast.walk(node) if isinstance(n, ast.Name)]
            continue
        for scope in scopes.get(name, []):
            todo += globals_of(scope)
        args = getattr(node, "args", None)
        top = [*node.decorator_list, *getattr(node, "bases", []), *getattr(node, "keywords", []),
               *(args.defaults + [d for d in args.kw_defaults if d is not None] if args else [])]
        todo += [n.id for sub in top for n in ast.walk(sub) if isinstance(n, ast.Name)]
    return True
