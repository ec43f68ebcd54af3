"""The shape of the code: minillm.py is the core, within its budgets, and the companions depend on it, never the
reverse at load time."""

import glob
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import core_budget  # noqa: E402


def modules_importing_minillm() -> set[str]:
    """The project's modules whose source imports minillm (at load time or inside a function)."""
    found = set()
    for path in glob.glob(os.path.join(ROOT, "*.py")):
        name = os.path.basename(path)[:-3]
        if name != "minillm" and re.search(r"^\s*(import minillm|from minillm import)", open(path).read(), re.M):
            found.add(name)
    return found


def test_importing_the_core_loads_no_companion():
    """minillm.py loads formats.py and paged_attention.py, which import nothing of it; every other companion
    (and every module that imports minillm) is loaded only when its feature is first used."""
    import minillm
    assert {"compat", "cli", "parallel"} <= modules_importing_minillm()
    assert not {"formats", "paged_attention"} & modules_importing_minillm()
    later = (set(minillm.COMPANIONS) - {"formats"}) | modules_importing_minillm()
    code = "import sys, minillm; print(' '.join(sorted(sys.modules)))"
    loaded = set(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.split())
    assert "minillm" in loaded and not later & loaded, later & loaded


def test_every_companion_the_core_names_exists_and_its_names_resolve():
    import minillm
    for name in minillm.COMPANIONS:
        assert os.path.exists(os.path.join(ROOT, f"{name}.py")), name
    # vLLM's other names are found in the companions (PEP 562), and a name in none of them is an AttributeError
    assert minillm.EngineArgs.__module__ == "compat" and minillm.LoRARequest.__module__ == "lora"
    try:
        minillm.no_such_name
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("an unknown name resolved")


def test_the_core_keeps_its_budgets():
    m = core_budget.measure(os.path.join(ROOT, "minillm.py"))
    assert core_budget.over_budget(m) == [], core_budget.over_budget(m)
    # the measure counts what it says: a docstring or a comment is not code
    path = os.path.join(ROOT, "tests", "_budget_sample.py")
    try:
        with open(path, "w") as f:
            f.write('"""doc\nstring"""\n\n# a comment\ndef f(x):\n    """doc"""\n    return x  # why\n')
        sample = core_budget.measure(path)
    finally:
        os.remove(path)
    assert (sample["lines"], sample["code"], sample["longest_function"]) == (7, 2, (3, "f"))
    over = dict(m, lines=core_budget.BUDGETS["lines"] + 1, longest_function=(41, "g"))
    assert core_budget.over_budget(over) == ["lines 1751 > 1750", "function g has 41 lines > 40"]


def test_the_walkthrough_route_and_the_readme_count_match_the_core():
    """walkthrough.md's first-evening route gives each section's lines; the README and the route give the counts."""
    sections = core_budget.route()  # (python tools/core_budget.py --docs rewrites the figures below)
    assert len(sections) == 11 and sections[1][0] > 1
    walkthrough = open(os.path.join(ROOT, "walkthrough.md")).read()
    route = [(int(a), int(b)) for a, b in re.findall(r"^\| [^|]+ \| (\d+)–(\d+) \|", walkthrough, re.M)]
    assert route == sections, (route, sections)
    m = core_budget.measure(os.path.join(ROOT, "minillm.py"))
    claim = f"{m['lines']:,} lines, {m['code']:,} of them code"
    assert claim in walkthrough, claim
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert f"is {m['lines']:,} lines ({m['code']:,} of code;" in readme
