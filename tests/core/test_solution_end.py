"""generation.code.solution_end: where a chat answer's scored code has ended, so evaluation can stop
decoding there (prompt.stop_after_solution). The property that matters: the program sanitize keeps
from the code up to that point is the program it keeps from the whole code."""
import itertools
import random

import pytest

from domino.core.generation.code import sanitize, solution_end

ENTRY = '''def f(xs):
    """Doc.
    >>> f([1])
    1
    """
    return helper(len(xs)) + LIMIT
'''
HELPER = "def helper(n):\n    return max(n, 0)\n"
LIMIT = "LIMIT = 3\n"
IMPORT = "import math\n"
TESTS = "# Test cases\nprint(f([1, 2]))\nassert f([]) == 3\n"


def test_fires_at_the_first_top_level_test_line_once_everything_resolves():
    code = HELPER + LIMIT + "\n" + ENTRY + "\n" + TESTS
    end = solution_end(code, "f")
    assert end == code.index("# Test cases")
    assert sanitize(code[:end], "f") == sanitize(code, "f")


def test_waits_for_names_defined_after_the_entry_point():
    # the entry point first, then its helper and constant: the comment between them is not the end
    code = ENTRY + "\n# a helper\n" + HELPER + "\n# the limit\n" + LIMIT + "\n" + TESTS
    end = solution_end(code, "f")
    assert end == code.index("# Test cases")
    assert sanitize(code[:end], "f") == sanitize(code, "f") and "LIMIT = 3" in sanitize(code, "f")
    # a module the entry point uses is imported after it: the end comes after the import
    uses_math = ENTRY.replace("len(xs)", "math.floor(len(xs))")
    code = HELPER + LIMIT + uses_math + "print(1)\n" + IMPORT + TESTS
    assert solution_end(code, "f") == code.index("# Test cases")


@pytest.mark.parametrize("line", ["def g():\n    pass\n", "class G:\n    pass\n", "@decorator\n", "import os\n",
                                  "from os import path\n", "async def g():\n    pass\n", "```\n",
                                  "    indented = 1\n", "\n"])
def test_lines_that_may_belong_to_the_solution_never_end_it(line):
    code = HELPER + LIMIT + ENTRY + line
    assert solution_end(code, "f") is None


def test_none_until_the_line_is_complete_and_the_entry_point_exists():
    code = HELPER + LIMIT + ENTRY + "print(f([1]))"
    assert solution_end(code, "f") is None  # no line break yet: the line may still become anything
    assert solution_end(code + "\n", "f") == len(HELPER + LIMIT + ENTRY)
    assert solution_end(HELPER + LIMIT + "print(1)\n", "f") is None  # no entry point yet
    assert solution_end(code + "\n", "g") is None  # another entry point


def test_unresolved_names_and_unparsable_code_keep_decoding():
    # `helper` never defined: a test line cannot end it
    assert solution_end(LIMIT + ENTRY + TESTS, "f") is None
    # a column-0 line inside the docstring: the code before it does not parse
    code = HELPER + LIMIT + 'def f(xs):\n    """\nExample at column 0\n    """\n    return 1\n' + TESTS
    assert solution_end(code, "f") == code.index("# Test cases")


def test_scopes_builtins_closures_classes_decorators_and_defaults():
    closure = ("def f(xs):\n    total = 0\n    def add(v):\n        nonlocal total\n        total += v\n"
               "    for x in sorted(xs):\n        add(x)\n    return total\n")
    assert solution_end(closure + TESTS, "f") == len(closure)  # locals, nonlocals, builtins
    cls = "class f:\n    def run(self):\n        return helper(1)\n"
    assert solution_end(cls + TESTS, "f") is None  # a method's global
    assert solution_end(HELPER + cls + TESTS, "f") == len(HELPER + cls)
    deco = "@wrap\ndef f(x, k=DEFAULT):\n    return x\n"
    assert solution_end(deco + TESTS, "f") is None
    assert solution_end("DEFAULT = 1\n" + deco + TESTS, "f") is None  # still no `wrap`
    assert solution_end("def wrap(g):\n    return g\nDEFAULT = 1\n" + deco + TESTS, "f") is not None
    # an assignment the entry point reads is followed to what it reads in turn
    chain = "TABLE = build()\ndef f(x):\n    return TABLE[x]\n"
    assert solution_end(chain + TESTS, "f") is None
    assert solution_end("def build():\n    return {}\n" + chain + TESTS, "f") is not None


def test_cutting_at_the_end_never_changes_the_sanitised_program():
    """Answers assembled from parts in random orders (helpers, constants, an import and the model's
    own tests before, between and after the entry point; no part redefines a name, the one case
    the rule cannot see coming): wherever solution_end fires, sanitize keeps the same program,
    unless the import comes after the end (sanitize keeps every import: the other exception)."""
    parts = {"entry": ENTRY, "helper": HELPER, "limit": LIMIT, "import": IMPORT, "tests": TESTS,
             "call": "result = f([3])\nprint(result)\n", "comment": "# notes\n",
             "main": 'if __name__ == "__main__":\n    print(f([1]))\n'}
    rng = random.Random(0)
    fired = checked = 0
    for _ in range(300):
        order = rng.sample(list(parts), len(parts))
        code = "".join(parts[k] for k in order)
        end = solution_end(code, "f")
        if end is None:
            continue
        fired += 1
        starts = list(itertools.accumulate(len(parts[k]) for k in order[:-1]))
        at = sum(s <= end for s in [0] + starts) - 1  # the part the end falls in
        if "import" in order[at + 1:]:
            continue
        checked += 1
        assert sanitize(code[:end], "f") == sanitize(code, "f"), (order, end)
    assert checked > 50 and fired > checked
