"""ssd_helpers.py reads as a book: sections in notebook order, one public surface.

Four checks, each of which a careless edit can break:

- no section calls a name that a later section defines (the appendix aside: it holds what the
  series uses but does not teach, so any section may use it);
- every top-level name without an underscore is in ``__all__``, and everything in ``__all__``
  exists and has a docstring that names its notebook;
- no notebook or test reaches for a private name of the module (``H._name`` under any alias,
  ``from ssd_helpers import _name`` in any layout, ``getattr(H, "_name")``);
- no line of the module, the tests or the notebooks' code is longer than 100 characters.
"""

import ast
import json
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODULE = ROOT / "ssd_helpers.py"
BANNER = re.compile(r"^# (\d+[ab]?|Appendix)[.:] ")


def _sections(lines):
    """Return [(first_line, section_name)] for each banner (a title between two dashed rules)."""
    found = []
    for i in range(1, len(lines) - 1):
        match = BANNER.match(lines[i])
        if match and lines[i - 1].startswith("# ----"):
            found.append((i + 1, match.group(1)))
    return found


def _module():
    text = MODULE.read_text(encoding="utf-8")
    return text, ast.parse(text)


def _top_level_names(node):
    """The names a top-level statement defines, also in tuple targets (``A, B = ...``) and inside
    a top-level ``if`` or ``try``."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return [name.id for target in targets for name in ast.walk(target)
                if isinstance(name, ast.Name)]
    if isinstance(node, (ast.If, ast.Try)):
        inner = node.body + node.orelse + getattr(node, "finalbody", [])
        inner += [stmt for handler in getattr(node, "handlers", []) for stmt in handler.body]
        return [name for stmt in inner for name in _top_level_names(stmt)]
    return []


def _where_defined(tree, sections):
    """Map each top-level name to the index of the section that defines it."""
    starts = [line for line, _ in sections]
    index = {}
    for node in tree.body:
        section = sum(1 for start in starts if start <= node.lineno) - 1
        for name in _top_level_names(node):
            index[name] = section
    return index


def forward_calls():
    """Every (user, user's section, name used, name's section) where the name is defined later."""
    text, tree = _module()
    sections = _sections(text.splitlines())
    defined = _where_defined(tree, sections)
    appendix = next(i for i, (_, name) in enumerate(sections) if name == "Appendix")
    starts = [line for line, _ in sections]
    found = []
    for node in tree.body:
        section = sum(1 for start in starts if start <= node.lineno) - 1
        user = (_top_level_names(node) or [f"line {node.lineno}"])[0]
        for inner in ast.walk(node):
            if (isinstance(inner, ast.Name) and isinstance(inner.ctx, ast.Load)
                    and inner.id in defined):
                later = defined[inner.id]
                if section < later != appendix:
                    found.append((user, sections[section][1], inner.id, sections[later][1]))
    return sorted(set(found))


def test_sections_are_in_notebook_order():
    text, _ = _module()
    names = [name for _, name in _sections(text.splitlines())]
    assert names == ["0", "1", "2", "3", "4a", "4b", "5", "6", "7", "8", "9", "10", "11", "12",
                     "Appendix"]


def test_no_section_calls_a_later_one():
    assert forward_calls() == []


def test_public_names_are_exported_and_documented():
    text, tree = _module()
    import ssd_helpers as H

    public = {name for node in tree.body for name in _top_level_names(node)
              if not name.startswith("_")}
    exported = set(H.__all__)
    assert sorted(public - exported) == [], "public-looking names outside __all__"
    assert sorted(exported - public) == [], "__all__ names that the module does not define"
    notebooks = {path.stem for path in (ROOT / "notebooks").glob("*.ipynb")}
    notebook = re.compile(r"\b(\d\d[ab]?_[a-z_]+[a-z])\b")
    for name in H.__all__:
        value = getattr(H, name)
        if callable(value):
            named = notebook.findall(value.__doc__ or "")
            assert named, f"{name}'s docstring names no notebook"
            assert set(named) <= notebooks, f"{name}'s docstring names {set(named) - notebooks}"


def _notebook_code():
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        yield path, "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


def _is_private(name):
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _code_in_string(node):
    """The text of a string literal that may hold code (``python -c``), f-string holes as None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(part.value if isinstance(part, ast.Constant) else "None"
                       for part in node.values)
    return None


def private_uses(code):
    """Every private name of ssd_helpers that ``code`` reaches for, as written: ``X._name`` where X
    is the module under any name it was imported as, ``from ssd_helpers import _name`` (one line or
    a parenthesised list), and getattr/setattr/monkeypatch.setattr(X, "_name"). Code inside string
    literals that mention ssd_helpers (``python -c``) is read the same way."""
    tree = ast.parse(code)
    aliases, found = {"ssd_helpers"}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name == "ssd_helpers"}
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Name):
            if node.value.id in aliases:  # M = H
                aliases |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.ImportFrom) and node.module == "ssd_helpers":
            found += [f"from ssd_helpers import {a.name}" for a in node.names
                      if _is_private(a.name)]
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases and _is_private(node.attr)):
            found.append(f"{node.value.id}.{node.attr}")
        elif (isinstance(node, ast.Call) and len(node.args) >= 2
              and isinstance(node.args[0], ast.Name) and node.args[0].id in aliases
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and _is_private(node.args[1].value)):
            found.append(f"{ast.unparse(node.func)}({node.args[0].id}, {node.args[1].value!r})")
        text = _code_in_string(node)
        if text is not None and "ssd_helpers" in text:
            try:
                found += private_uses(text)
            except SyntaxError:
                pass  # prose, not code
    return sorted(found)


# The module's name is filled in later, so that the scan of this file does not take the sample for
# code of its own.
SAMPLE = """
import {module} as bd
import {module}
from {module} import (
    TinySSD,
    _tight_box,
)
bd._banana_scene(bd.BACKGROUND_FILES, bd.__file__)
{module}._MANIFEST_FILE
getattr(bd, "_image_rng")
monkeypatch.setattr(bd, "_records", None)
subprocess.run(["python", "-c", "import {module} as M; M._records()"])
N = bd
N._scan
import numpy as np
np._core
"""


def test_the_surface_check_sees_aliases_and_import_lists():
    expected = ["from {module} import _tight_box", "bd._banana_scene", "{module}._MANIFEST_FILE",
                "getattr(bd, '_image_rng')", "monkeypatch.setattr(bd, '_records')", "M._records",
                "N._scan"]
    assert private_uses(SAMPLE.format(module="ssd_helpers")) == sorted(
        use.format(module="ssd_helpers") for use in expected)
    assert private_uses(SAMPLE.format(module="other_module")) == []


def _readme_code():
    """The README's Python examples, each read as if ``import ssd_helpers as H`` came first."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for block in re.findall(r"```python\n(.*?)```", text, re.S):
        yield "import ssd_helpers as H\n" + block


def test_notebooks_and_tests_use_only_the_public_surface():
    found = [(path.name, use) for path, code in _notebook_code() for use in private_uses(code)]
    found += [("README.md", use) for code in _readme_code() for use in private_uses(code)]
    for path in sorted((ROOT / "tests").rglob("*.py")):
        found += [(str(path.relative_to(ROOT)), use)
                  for use in private_uses(path.read_text(encoding="utf-8"))]
    assert found == []


def test_lines_fit_on_a_page():
    """At most 100 characters: the module, the tests and the notebooks' code (ruff's limit too)."""
    texts = {path: path.read_text(encoding="utf-8")
             for path in [MODULE, *sorted((ROOT / "tests").rglob("*.py"))]}
    texts.update(_notebook_code())
    long = [f"{path.name}:{i + 1}" for path, text in texts.items()
            for i, line in enumerate(text.splitlines()) if len(line) > 100]
    assert long == [], f"{len(long)} lines over 100 characters: {long[:5]}"
