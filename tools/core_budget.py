"""
How big each module is, and whether minillm.py keeps the core's budgets. The README's "read in an evening" figure
comes from here.

    python tools/core_budget.py          # a table of every module; exit status 1 when minillm.py is over budget
    python tools/core_budget.py --docs   # also rewrite the counts in README.md and the route's line ranges in
                                         # walkthrough.md (tests/test_shape.py checks that they match)

Lines of code: lines that are not blank, not comment-only and not part of a docstring (module, class or function).
"""

import ast
import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGETS = dict(lines=1750, code=1250, bytes=110_000, widest=120, longest_function=40)


def measure(path: str) -> dict:
    """lines, code (lines of code), bytes, widest (characters), longest_function (lines, with its name)."""
    src = open(path, encoding="utf-8").read()
    tree = ast.parse(src)
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                docstrings.update(range(first.lineno, first.end_lineno + 1))
    lines = src.splitlines()
    code = sum(1 for i, line in enumerate(lines, 1)
               if line.strip() and not line.strip().startswith("#") and i not in docstrings)
    functions = [(node.end_lineno - node.lineno + 1, node.name) for node in ast.walk(tree)
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return dict(lines=len(lines), code=code, bytes=len(src.encode()), widest=max(map(len, lines), default=0),
                longest_function=max(functions, default=(0, "-")))


def over_budget(m: dict) -> list[str]:
    """What in minillm.py's measures breaks its budget, in words (empty: all within)."""
    found = [f"{key} {m[key]} > {BUDGETS[key]}" for key in ("lines", "code", "bytes", "widest") if m[key] > BUDGETS[key]]
    n, name = m["longest_function"]
    if n > BUDGETS["longest_function"]:
        found.append(f"function {name} has {n} lines > {BUDGETS['longest_function']}")
    return found


def route() -> list[tuple[int, int]]:
    """The first and last line of each part of minillm.py: its top (up to the first banner), then each numbered
    section (`# N. ...`) up to the blank lines before the next banner."""
    lines = open(os.path.join(ROOT, "minillm.py"), encoding="utf-8").read().splitlines()
    banners = [i for i, line in enumerate(lines, 1) if re.match(r"# \d+\. ", line)]
    return [(1, banners[0] - 3)] + [(b, nxt - 3) for b, nxt in zip(banners, banners[1:] + [len(lines) + 3])]


def update_docs() -> None:
    """README.md's "is N lines (M of code;" and walkthrough.md's route table and count, from minillm.py as it is."""
    m = measure(os.path.join(ROOT, "minillm.py"))
    path = os.path.join(ROOT, "walkthrough.md")
    text = open(path, encoding="utf-8").read()
    rows = list(re.finditer(r"^(\| [^|]+ \| )(\d+)–(\d+)( \|)", text, re.M))
    for row, (first, last) in reversed(list(zip(rows, route()))):
        text = text[:row.start()] + f"{row.group(1)}{first}–{last}{row.group(4)}" + text[row.end():]
    text = re.sub(r"[\d,]+ lines, [\d,]+ of them code", f"{m['lines']:,} lines, {m['code']:,} of them code", text)
    open(path, "w", encoding="utf-8").write(text)
    path = os.path.join(ROOT, "README.md")
    text = re.sub(r"is [\d,]+ lines \([\d,]+ of code;", f"is {m['lines']:,} lines ({m['code']:,} of code;",
                  open(path, encoding="utf-8").read())
    open(path, "w", encoding="utf-8").write(text)


def main() -> int:
    if "--docs" in sys.argv[1:]:
        update_docs()
    print(f"{'module':<20} {'lines':>6} {'code':>6} {'bytes':>8} {'widest':>7}  longest function")
    for path in sorted(glob.glob(os.path.join(ROOT, "*.py"))):
        m = measure(path)
        n, name = m["longest_function"]
        print(f"{os.path.basename(path):<20} {m['lines']:>6} {m['code']:>6} {m['bytes']:>8} {m['widest']:>7}  {name} ({n})")
    problems = over_budget(measure(os.path.join(ROOT, "minillm.py")))
    budgets = ", ".join(f"{k} {v:,}" for k, v in BUDGETS.items())
    print(f"minillm.py budgets ({budgets}): " + ("; ".join(problems) if problems else "all kept"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
