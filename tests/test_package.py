"""The pack's shape: a pure core, an import-safe root, requirements that agree."""

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
HOST_MODULES = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "nodes", "server", "execution", "comfy_execution"}


def imported_top_level_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_core_never_imports_the_host():
    offenders = {}
    for path in (ROOT / "fastguidance").rglob("*.py"):
        bad = imported_top_level_modules(path) & HOST_MODULES
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert offenders == {}, f"the core must not import ComfyUI: {offenders}"


def test_core_never_reaches_out_of_its_package():
    for path in (ROOT / "fastguidance").rglob("*.py"):
        tree = ast.parse(path.read_text())
        depth = len(path.relative_to(ROOT / "fastguidance").parts) - 1
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level > depth + 1:
                raise AssertionError(f"{path}: relative import leaves the core package")


RESEARCH = "fastguidance.research"


def runtime_files() -> list[Path]:
    """What ComfyUI can import: the glue and the core outside its research package."""
    core = [path for path in (ROOT / "fastguidance").rglob("*.py")
            if (ROOT / "fastguidance" / "research") not in path.parents and path.name != "__main__.py"]
    return sorted((ROOT / "nodes").glob("*.py")) + [ROOT / "__init__.py"] + sorted(core)


def imported_pack_modules(path: Path) -> set[str]:
    """Every pack module ``path`` imports (at any depth of its code), as ``fastguidance.…`` / ``nodes.…``."""
    package = list(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - node.level + 1]
            module = ".".join(base + ([node.module] if node.module else []))
            found.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fastguidance"):
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("fastguidance"))
    return found


def test_what_comfyui_imports_never_reaches_the_research_code():
    offenders = {str(path.relative_to(ROOT)): sorted(name for name in imported_pack_modules(path)
                                                    if name == RESEARCH or name.startswith(RESEARCH + "."))
                 for path in runtime_files()}
    assert {path: names for path, names in offenders.items() if names} == {}, \
        "the runtime (nodes/ and the core outside fastguidance/research/) must not import the research code"


def test_importing_the_runtime_core_loads_no_research_module():
    modules = [".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
               for path in runtime_files() if path.parts[-2:] != ("main", "__init__.py")
               and path.relative_to(ROOT).parts[0] == "fastguidance"]
    script = ("import importlib, sys\n"
              f"for name in {modules!r}: importlib.import_module(name)\n"
              f"print(sorted(m for m in sys.modules if m.startswith({RESEARCH!r})))")
    loaded = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert len(modules) >= 15 and loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr


def test_root_init_imports_without_comfyui():
    spec = importlib.util.spec_from_file_location("fastguidance_pack_root", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    assert module.WEB_DIRECTORY == "./js"
    assert (ROOT / "js").is_dir()
    if importlib.util.find_spec("comfy_api") is None:
        assert not hasattr(module, "comfy_entrypoint")


def test_requirements_never_list_torch_and_agree_with_pyproject():
    requirements = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    requirements = sorted(r for r in requirements if r)
    assert not any(re.match(r"torch\b", r) for r in requirements)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert sorted(project["project"]["dependencies"]) == requirements
    assert "tool" in project and "comfy" in project["tool"]
    assert project["tool"]["comfy"]["requires-comfyui"].startswith(">=")
    assert "requires-comfyui" not in project["project"], "one place: [tool.comfy], where the registry reads it"


def node_ids() -> set[str]:
    return set(re.findall(r'node_id="(FastGuidance_[A-Za-z0-9]+)"', "".join(
        p.read_text() for p in (ROOT / "nodes").glob("*.py"))))


def test_every_node_is_in_the_readme_and_the_node_list():
    readme = (ROOT / "README.md").read_text()
    ids = node_ids()
    assert ids, "no node ids found"
    for node_id in ids:
        assert node_id in readme, f"README.md does not document {node_id}"
    node_list = (ROOT / "nodes" / "__init__.py").read_text()
    classes = node_classes()
    assert len(classes) == len(ids), (sorted(classes), sorted(ids))
    for cls in classes:
        assert cls in node_list, f"{cls} is not in the one list of nodes (nodes/__init__.py)"


def node_classes() -> dict[str, list[str]]:
    """Every class of nodes/ that declares a node (it defines ``define_schema``) → the names of its bases."""
    classes = {}
    for path in (ROOT / "nodes").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(isinstance(item, ast.FunctionDef) and item.name == "define_schema"
                                                      for item in node.body):
                classes[node.name] = [ast.unparse(base) for base in node.bases]
    return classes


def test_every_node_checks_its_inputs_the_one_shared_way():
    """ValidatedNode (nodes/validation.py) gives validate_inputs and the check before execute; a node that
    derived from io.ComfyNode directly could forget both (the real-host suite checks the classes themselves)."""
    for cls, bases in node_classes().items():
        assert bases == ["ValidatedNode"], f"{cls} derives from {bases}: derive it from ValidatedNode"


def test_no_print_in_the_pack():
    for folder in ("fastguidance", "nodes"):
        for path in (ROOT / folder).rglob("*.py"):
            tree = ast.parse(path.read_text())
            calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "print"]
            assert not calls, f"{path} uses print(); use logging"


def test_objects_shared_across_model_clones_have_one_way_to_say_so():
    """Only nodes/shared_across_clones.py defines __deepcopy__; what a MODEL's options hold derives from it."""
    for path in (ROOT / "nodes").glob("*.py"):
        defines = [node.name for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, ast.FunctionDef) and node.name == "__deepcopy__"]
        assert not defines or path.name == "shared_across_clones.py", f"{path.name}: derive from SharedAcrossClones"
