"""The package's shape: no import cycle, every module imports alone, short files."""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "switchjax")


def _modules() -> dict[str, str]:
  """Dotted module name -> file path, for every module of the package."""
  out = {}
  for folder, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(folder, f)
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        out[name.removesuffix(".__init__")] = path
  return out


def _imports(name: str, path: str, modules: dict[str, str]) -> set[str]:
  """Package modules that `name` imports anywhere (lazy imports too)."""
  package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
      targets = [base] + [f"{base}.{a.name}" for a in node.names]
    else:
      continue
    found |= {t for t in targets if t in modules}
  # A package and its own submodules are not a cycle (switchjax.data -> .pipeline).
  return {t for t in found if t != name and not t.startswith(name + ".")
          and not name.startswith(t + ".")}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  cycles, state, stack = [], {}, []

  def visit(u):
    state[u] = "open"
    stack.append(u)
    for v in sorted(graph[u]):
      if state.get(v) == "open":
        cycles.append(stack[stack.index(v):] + [v])
      elif v not in state:
        visit(v)
    stack.pop()
    state[u] = "done"

  for u in sorted(graph):
    if u not in state:
      visit(u)
  return cycles


def test_cycle_finder_finds_a_cycle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert _cycles(graph) == [["a", "b", "c", "a"]]
  assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
  modules = _modules()
  graph = {m: _imports(m, p, modules) for m, p in modules.items()}
  assert graph["switchjax.moe"] >= {"switchjax.experts", "switchjax.dispatch"}
  assert _cycles(graph) == []


def test_every_module_imports_alone():
  """Each module imported first, in a clean set of switchjax modules.

  One interpreter for all (a fresh one per module costs seconds each): the
  flags the entry points define are dropped between imports, and the tfds
  builders stay loaded, since tfds refuses a second registration.
  """
  kept = ("switchjax.data.kjv_books", "switchjax.data.tfds_corpus")
  names = [*kept] + sorted(m for m in _modules()
                           if m != "switchjax" and m not in kept)
  script = (
      "import importlib, sys\n"
      "from absl import flags\n"
      f"for name in {names!r}:\n"
      "  for flag in [f for f in list(flags.FLAGS) if flags.FLAGS\n"
      "               .find_module_defining_flag(f, '').startswith('switchjax')]:\n"
      "    delattr(flags.FLAGS, flag)\n"
      "  for m in [m for m in sys.modules if m.startswith('switchjax')\n"
      f"            and m not in {kept!r}]:\n"
      "    del sys.modules[m]\n"
      "  importlib.import_module(name)\n"
      "print('ok')\n")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.strip().endswith("ok")


@pytest.mark.parametrize("limit", [600])
def test_no_long_module(limit):
  long = {m: n for m, p in _modules().items()
          if (n := open(p).read().count("\n")) > limit}
  assert not long


def test_train_functions_are_short():
  tree = ast.parse(open(os.path.join(PACKAGE, "train.py")).read())
  lengths = {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(tree)
             if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
  assert lengths and max(lengths.values()) <= 80, lengths
