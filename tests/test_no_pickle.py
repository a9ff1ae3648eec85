"""No loader in the project may run code from a checkpoint: every ``torch.load`` says
``weights_only=True``, and nothing calls ``pickle.load(s)`` or ``numpy.load(..., allow_pickle=True)``.
Repo-wide on purpose: toy/, llm/, probes/, plumbing/, bench/ and the tests themselves.
(The Trainer's own loaders are pinned by tests/test_llm_sft.py::test_checkpoint_with_a_pickle_payload_is_not_executed_on_resume.)
"""

import ast
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _python_files() -> list[Path]:
    files = []
    for root, dirs, names in os.walk(REPO):  # followlinks=False: .cache is a symlink to a shared cache
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("__pycache__", "runs")]
        files += [Path(root) / n for n in names if n.endswith(".py")]
    return sorted(files)


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else "?"


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_loads(source: str) -> list[int]:
    """Line numbers of calls that could unpickle arbitrary objects."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name, kw = _name(node.func), {k.arg: k.value for k in node.keywords}
        if (
            (name == "torch.load" and not _is_true(kw.get("weights_only")))
            or name in ("pickle.load", "pickle.loads")
            or (name in ("np.load", "numpy.load") and _is_true(kw.get("allow_pickle")))
        ):
            lines.append(node.lineno)
    return lines


def test_the_checker_catches_what_it_should():
    assert unsafe_loads(
        "torch.load(f)\ntorch.load(f, weights_only=False)\npickle.loads(b)\nnp.load(f, allow_pickle=True)"
    ) == [1, 2, 3, 4]
    assert unsafe_loads("torch.load(f, map_location='cpu', weights_only=True)\nnp.load(f)\nload_file(f)") == []


def test_no_loader_unpickles():
    found = {}
    for path in _python_files():
        lines = unsafe_loads(path.read_text(encoding="utf-8"))
        if lines:
            found[path.relative_to(REPO).as_posix()] = lines
    assert not found, f"load with weights_only=True (safetensors for anything else): {found}"
