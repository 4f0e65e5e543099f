"""Every hvla module imports on its own, and no modules import each other in a cycle.

A cycle of module-level imports need not fail: `from hvla import x` finds a partially
initialised `x`, and the import only breaks when some module uses a name of one that has
not run yet, which depends on which module of the cycle is imported first. So the cycle
test reads the import statements instead of importing, and names the modules of any
cycle it finds.
"""
import ast
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hvla_modules():
  """{module name: source path} of every module under hvla/."""
  modules = {}
  for root, _, files in os.walk(os.path.join(REPO, "hvla")):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(root, name)
        parts = os.path.relpath(path, REPO)[:-len(".py")].split(os.sep)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return modules


def module_level_imports(name, path, modules):
  """The hvla modules that importing `name` imports while it runs, not those that its
  functions import when called."""
  package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
  targets = set()

  def visit(node):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      return
    if isinstance(node, ast.Import):
      targets.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
        base = f"{parent}.{base}" if base else parent
      for alias in node.names:
        targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    for child in ast.iter_child_nodes(node):
      visit(child)

  with open(path) as f:
    visit(ast.parse(f.read(), path))
  edges = set()
  for target in targets:
    parts = target.split(".")
    for i in range(1, len(parts) + 1):  # importing a.b.c imports a, a.b and a.b.c
      module = ".".join(parts[:i])
      # A module's own packages are imported before it runs; a package that imports
      # its own modules is no cycle.
      if module in modules and not (name == module or name.startswith(module + ".")):
        edges.add(module)
  return edges


def find_cycle(graph):
  """A list of modules [a, b, ..., a] that import each other in a cycle, or None."""
  state = {}  # 1: on the current path, 2: done

  def visit(node, path):
    state[node] = 1
    for target in sorted(graph[node]):
      if state.get(target) == 1:
        return path[path.index(target):] + [target]
      if target not in state:
        cycle = visit(target, path + [target])
        if cycle:
          return cycle
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node, [node])
      if cycle:
        return cycle
  return None


def test_find_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_no_module_level_import_cycles():
  modules = hvla_modules()
  assert {"hvla", "hvla.config", "hvla.sharding", "hvla.data.pipeline"} <= set(modules)
  graph = {name: module_level_imports(name, path, modules) for name, path in modules.items()}
  assert "hvla.sharding" in graph["hvla.train"]  # the edges are read
  cycle = find_cycle(graph)
  assert cycle is None, "modules import each other in a cycle: " + " -> ".join(cycle)


def test_every_module_imports_first():
  """Each module, imported before any other hvla module (in one process, forgetting the
  hvla modules and the absl flags they defined between imports), imports without an
  error. tfds refuses to register a dataset builder class a second time, so the imports
  skip that registration."""
  script = (
      "import importlib, sys, traceback\n"
      "from absl import flags\n"
      "from tensorflow_datasets.core import registered\n"
      "failed = []\n"
      "for name in sys.argv[1:]:\n"
      "  for loaded in [m for m in sys.modules if m == 'hvla' or m.startswith('hvla.')]:\n"
      "    del sys.modules[loaded]\n"
      "  for module, defined in flags.FLAGS.flags_by_module_dict().items():\n"
      "    if module == 'hvla' or module.startswith('hvla.'):\n"
      "      for flag in {f.name for f in defined}:\n"
      "        delattr(flags.FLAGS, flag)\n"
      "  try:\n"
      "    with registered.skip_registration():\n"
      "      importlib.import_module(name)\n"
      "  except Exception:\n"
      "    failed.append(name + ':\\n' + traceback.format_exc())\n"
      "print('\\n'.join(failed))\n"
      "sys.exit(1 if failed else 0)\n")
  result = subprocess.run([sys.executable, "-c", script, *sorted(hvla_modules())],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr[-3000:]
