"""The pack's start-up cost inside ComfyUI: the time, memory and modules that loading it adds.

Why: issue 23 asks that "what ComfyUI imports at start-up is the runtime only — measure the pack's import time and
memory inside ComfyUI before and after" the core is split into per-method modules and a research subpackage.

What: each repeat is a fresh Python process that starts the host as ComfyUI's ``main.py`` does up to the custom
nodes (arguments parsed from ``main.py --cpu --base-directory TMP``; ``import comfy.utils, execution, server, nodes``;
a ``PromptServer``; ``nodes.init_extra_nodes(init_custom_nodes=False)``, i.e. the built-in and API nodes, which load
before custom nodes), then loads the pack through the host's public ``nodes.load_custom_node(path)`` (a coroutine on
both hosts; a plain return value is accepted too). Around that call only, it measures:

- wall time (``time.perf_counter``);
- resident memory growth (VmRSS from ``/proc/self/status``, Linux only);
- the modules added to ``sys.modules``: the pack's own by name (``fastguidance.report``, ``nodes.tune``) and, by
  top-level package, the third-party, host and standard-library modules that nothing had imported before, i.e. what
  the pack alone pulls in on top of a default ComfyUI start.

The Python heap (tracemalloc) is left out: tracing every allocation slows imports several-fold and distorts the time.
A first, discarded process compiles the bytecode (into a temporary PYTHONPYCACHEPREFIX, so nothing is written into the
host, its venv or the pack) and warms the file cache, so the repeats see a second start of ComfyUI. The pack is copied
to a temporary folder named ``fastguidance_pack`` (ComfyUI names the module after its folder); the given one is only
read. Children run with OMP_NUM_THREADS=1 and inherit the rest of the environment.

Run with the host's own Python (on this machine torchvision needs the stub on PYTHONPATH, COMFYUI.md §6):

    PYTHONPATH=/work/hosts/sitecustomize /work/hosts/venv-0.33.0/bin/python benchmarks/import_cost.py \\
        --comfyui /work/hosts/comfyui-0.33.0 --pack . --repeats 7 --json import_cost_0.33.0.json

It prints the median, min and max of each figure and the modules; ``--json`` writes every repeat and the summary.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACK_FOLDER_NAME = "fastguidance_pack"
COPY_IGNORE = shutil.ignore_patterns(".git", "node_modules", "__pycache__", ".venv", ".pytest_cache", "bench_out")
FIGURES = {"load_s": "load time (s)", "rss_growth_mib": "RSS growth (MiB)", "modules_added": "modules added"}


def resident_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def module_location(module) -> str:
    return getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", None) or []), "")


def measure_in_child(comfyui: str, pack: str, base_directory: str) -> dict:
    """Start the host up to its custom nodes, load the pack, and return what the load added."""
    sys.path[0] = comfyui  # as under `python main.py` (it was this script's folder)
    sys.argv = ["main.py", "--cpu", "--base-directory", base_directory]
    import asyncio

    import main as comfyui_main  # noqa: F401  (its module level is the host's start-up before the server:
    # arguments, logging, model paths, prestartup scripts, imports)
    import comfyui_version
    import nodes
    import server
    import torch

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    server.PromptServer(loop)
    loop.run_until_complete(nodes.init_extra_nodes(init_custom_nodes=False))

    gc.collect()
    modules_before = set(sys.modules)
    resident_before = resident_kib()
    start = time.perf_counter()
    loaded = nodes.load_custom_node(pack)
    if inspect.isawaitable(loaded):
        loaded = loop.run_until_complete(loaded)
    load_s = time.perf_counter() - start
    resident_after = resident_kib()
    if not loaded:
        raise SystemExit(f"ComfyUI could not load the pack at {pack} (its log above says why)")

    added = sorted(set(sys.modules) - modules_before)
    init_file = os.path.join(pack, "__init__.py")
    pack_module = next(name for name in added if module_location(sys.modules[name]) == init_file)
    pack_modules, new_packages = [], {"third_party": {}, "host": {}, "stdlib": {}}
    for name in added:
        if name == pack_module or name.startswith(pack_module + "."):
            pack_modules.append(name[len(pack_module) + 1:] or "__init__")
            continue
        top = name.partition(".")[0]
        if top in sys.stdlib_module_names:
            kind = "stdlib"
        elif module_location(sys.modules.get(top)).startswith(comfyui + os.sep):
            kind = "host"
        else:
            kind = "third_party"
        new_packages[kind][top] = new_packages[kind].get(top, 0) + 1
    return {
        "load_s": load_s, "rss_growth_mib": (resident_after - resident_before) / 1024, "modules_added": len(added),
        "pack_modules": pack_modules, "new_packages": new_packages,
        "comfyui_version": comfyui_version.__version__, "torch": torch.__version__, "python": sys.version.split()[0],
    }


def run_child(comfyui: Path, pack: Path, work: Path) -> dict:
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPYCACHEPREFIX=str(work / "pycache"))
    command = [sys.executable, str(Path(__file__).resolve()), "--child",
               "--comfyui", str(comfyui), "--pack", str(pack), "--base-directory", str(work / "base")]
    child = subprocess.run(command, cwd=comfyui, env=environment, capture_output=True, text=True)
    if child.returncode != 0:
        raise SystemExit(f"the measuring process failed (exit {child.returncode}):\n{child.stderr[-4000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def summarise(repeats: list[dict]) -> dict:
    first = repeats[0]
    summary = {key: {"median": statistics.median(r[key] for r in repeats), "min": min(r[key] for r in repeats),
                     "max": max(r[key] for r in repeats)} for key in FIGURES}
    summary["modules_same_in_every_repeat"] = all(
        (r["pack_modules"], r["new_packages"]) == (first["pack_modules"], first["new_packages"]) for r in repeats)
    return summary


def print_table(result: dict) -> None:
    first, summary = result["repeats"][0], result["summary"]
    print(f"ComfyUI {first['comfyui_version']} ({result['comfyui']}), torch {first['torch']}, "
          f"Python {first['python']}; pack {result['pack']}; {len(result['repeats'])} repeats after one warm-up")
    print(f"{'':<18}{'median':>10}{'min':>10}{'max':>10}")
    for key, label in FIGURES.items():
        print(f"{label:<18}" + "".join(f"{summary[key][stat]:>10.3f}" for stat in ("median", "min", "max")))
    print(f"pack modules ({len(first['pack_modules'])}): {', '.join(first['pack_modules'])}")
    for kind, packages in first["new_packages"].items():
        listed = ", ".join(f"{name} ({count})" for name, count in sorted(packages.items())) or "none"
        print(f"new {kind.replace('_', '-')} packages (modules): {listed}")
    if not summary["modules_same_in_every_repeat"]:
        print("note: the modules added differ between repeats; see the JSON")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", type=Path, required=True, help="a ComfyUI checkout (only read)")
    parser.add_argument("--pack", type=Path, required=True, help="the pack's folder (only read)")
    parser.add_argument("--repeats", type=int, default=7, help="fresh processes measured (default 7)")
    parser.add_argument("--json", type=Path, help="write every repeat and the summary here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--base-directory", help=argparse.SUPPRESS)
    options = parser.parse_args()
    comfyui, pack = options.comfyui.resolve(), options.pack.resolve()
    if options.child:
        print(json.dumps(measure_in_child(str(comfyui), str(pack), options.base_directory)), flush=True)
        return
    if options.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {options.repeats}")
    if not (comfyui / "nodes.py").is_file():
        parser.error(f"--comfyui {comfyui}: no nodes.py there; give the root of a ComfyUI checkout")
    if not (pack / "__init__.py").is_file():
        parser.error(f"--pack {pack}: no __init__.py there; give the pack's root folder")
    if options.json:  # imported before the runs, so that a broken checkout fails now, not after them
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from fastguidance.files import atomic_write_text

    with tempfile.TemporaryDirectory(prefix="import_cost_") as temporary:
        work = Path(temporary)
        pack_copy = work / PACK_FOLDER_NAME
        shutil.copytree(pack, pack_copy, symlinks=True, ignore=COPY_IGNORE)
        (work / "base" / "custom_nodes").mkdir(parents=True)  # the host's folders go there, not into its tree
        run_child(comfyui, pack_copy, work)  # warm-up: bytecode and file cache
        repeats = [run_child(comfyui, pack_copy, work) for _ in range(options.repeats)]
    result = {"comfyui": str(comfyui), "pack": str(pack), "repeats": repeats, "summary": summarise(repeats)}
    print_table(result)
    if options.json:
        atomic_write_text(options.json, json.dumps(result, indent=2) + "\n")
        print(f"wrote {options.json}")


if __name__ == "__main__":
    main()
