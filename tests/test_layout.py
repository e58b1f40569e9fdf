"""The layout rule: entry scripts sit on library modules and never import one another."""

import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_SCRIPTS = sorted(
    os.path.basename(p)[:-3]
    for pattern in ("main_*.py", "eval_*.py", "demo.py")
    for p in glob.glob(os.path.join(ROOT, pattern))
)


def imported_modules(path):
    """Top-level names of every module ``path`` imports, anywhere in the file."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_entry_scripts_are_found():
    assert {"main_pretrain", "main_linear", "eval_knn", "demo"} <= set(ENTRY_SCRIPTS)


def test_no_python_file_imports_an_entry_script():
    """Neither an entry script nor a library module, tool or benchmark imports an entry script
    (tests may: they exercise them)."""
    sources = [
        p
        for p in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True)
        if not os.path.relpath(p, ROOT).startswith(("tests", ".venv", "."))
    ]
    offenders = {
        os.path.relpath(p, ROOT): sorted(imported_modules(p) & set(ENTRY_SCRIPTS))
        for p in sources
        if imported_modules(p) & set(ENTRY_SCRIPTS)
    }
    assert offenders == {}


def test_the_rule_sees_every_form_of_import(tmp_path):
    """The checker itself: plain, dotted, aliased and nested imports are all seen."""
    source = tmp_path / "x.py"
    source.write_text("import main_linear as m\ndef f():\n    from eval_knn import knn_correct\nimport data.build\n")
    assert imported_modules(source) == {"main_linear", "eval_knn", "data"}
