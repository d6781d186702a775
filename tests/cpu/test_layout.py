"""The layout's principles, checked on the source:

- no package imports the layer above it (the import graph, read from every
  module's AST, against the layer table below);
- the Ray-free modules import no `ray`: each is imported in a fresh
  interpreter in which `import ray` fails.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]  # the repository root = the `ziggurat` package

# Top to bottom. A module may import its own layer and the layers below it.
# Root modules config / sampling_params / outputs are the shared public types
# (bottom); llm.py is the offline API over the engine (beside the ingress).
LAYERS = [
    ("cluster", ["cluster"]),
    ("entry", ["actors.ingress", "llm"]),
    ("router", ["actors.router"]),
    ("scheduler", ["actors.scheduler"]),
    ("meter", ["actors.meter"]),
    ("worker", ["actors.worker"]),
    ("actor-runtime", ["actors.process", "actors.metrics", "actors.tracing"]),
    ("models", ["models"]),
    ("kernels", ["kernels"]),
    ("topology", ["topology"]),
    ("types", ["config", "sampling_params", "outputs"]),
]
EXEMPT = {"", "scripts", "tests"}  # the package's lazy __init__, scripts and tests may import anything
PACKAGE_INITS = {"actors"}  # namespace-only packages (a docstring, no imports)

# Modules that must run without Ray (tests drive them directly; the offline
# LLM and the in-process HTTP app are built from them).
RAY_FREE = [
    "ziggurat.llm",
    "ziggurat.config",
    "ziggurat.sampling_params",
    "ziggurat.outputs",
    "ziggurat.actors.process",
    "ziggurat.actors.metrics",
    "ziggurat.actors.scheduler.engine",
    "ziggurat.actors.scheduler.executor",
    "ziggurat.actors.scheduler.loop",
    "ziggurat.actors.scheduler.usage",
    "ziggurat.actors.scheduler.streams",
    "ziggurat.actors.scheduler.messages",
    "ziggurat.actors.scheduler.validation",
    "ziggurat.actors.scheduler.output_processor",
    "ziggurat.actors.scheduler.scheduler",
    "ziggurat.actors.scheduler.kv_manager",
    "ziggurat.models.gguf",
    "ziggurat.models.gguf_dequant",
    "ziggurat.models.gguf_tokenizer",
    "ziggurat.actors.router.policy",
    "ziggurat.actors.router.kv_index",
    "ziggurat.actors.router.scoring",
    "ziggurat.actors.router.messages",
    "ziggurat.actors.meter.tenancy",
    "ziggurat.actors.meter.quota",
    "ziggurat.actors.meter.messages",
    "ziggurat.actors.ingress.server",
    "ziggurat.actors.ingress.protocol",
    "ziggurat.actors.ingress.gatekeeper",
    "ziggurat.actors.ingress.engine_client",
    "ziggurat.actors.ingress.local_engine",
    "ziggurat.actors.ingress.usage_records",
    "ziggurat.actors.ingress.delivery_journal",
    "ziggurat.actors.ingress.http_protocol",
    "ziggurat.models.worker",
    "ziggurat.models.maker",
    "ziggurat.models.kv_blocks",
    "ziggurat.models.kv_transfer",
    "ziggurat.topology.kv_transport",
    "ziggurat.cluster.spec",
    "ziggurat.cluster.deployment_file",
    "ziggurat.actors.tracing",
    "ziggurat.topology.nvml",
    "ziggurat.models.lora",
    "ziggurat.models.lora_maker",
    "ziggurat.kernels.lora",
    "ziggurat.kernels.fp8",
    "ziggurat.models.quantization",
    "ziggurat.actors.scheduler.lora",
    "ziggurat.actors.ingress.adapters",
]


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_module(dotted: str) -> bool:
    path = ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def layer_of(module: str) -> int | None:
    """Index into LAYERS of a module named relative to the package (None: exempt)."""
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def imports_of(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, module relative to `ziggurat`) for every ziggurat import in the file, wherever it sits."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = _module_name(path).split(".")
    if path.name != "__init__.py":
        pkg = pkg[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name[len("ziggurat."):]) for a in node.names if a.name.startswith("ziggurat.")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = pkg[: len(pkg) - node.level + 1] if node.level > 1 else pkg
                mod = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("ziggurat"):
                mod = node.module[len("ziggurat."):] if node.module != "ziggurat" else ""
            else:
                continue
            # `from ziggurat.actors.ingress import server` names a module, not an attribute
            for a in node.names:
                sub = f"{mod}.{a.name}" if mod else a.name
                out.append((node.lineno, sub if _is_module(sub) else mod))
    return out


def source_files():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0].startswith(".") or rel.parts[0] in ("build",) or "egg-info" in rel.parts[0]:
            continue
        yield path


def violations(files=None) -> list[str]:
    bad = []
    for path in files or source_files():
        me = _module_name(path)
        if me.split(".")[0] in EXEMPT or me in PACKAGE_INITS:
            continue
        mine = layer_of(me)
        if mine is None:
            bad.append(f"{path.relative_to(ROOT)}: module {me!r} belongs to no layer (add it to LAYERS)")
            continue
        for line, target in imports_of(path):
            theirs = layer_of(target)
            if theirs is None:
                if target.split(".")[0] not in EXEMPT:
                    bad.append(f"{path.relative_to(ROOT)}:{line}: imports {target!r}, which belongs to no layer")
                elif target.split(".")[0] == "scripts":
                    bad.append(f"{path.relative_to(ROOT)}:{line}: run-time code imports scripts/ ({target})")
                continue
            if theirs < mine:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {LAYERS[mine][0]} layer imports {target!r} "
                           f"from the {LAYERS[theirs][0]} layer above it")
    return bad


def test_no_package_imports_the_layer_above_it():
    assert violations() == []


def test_the_import_check_catches_an_upward_import(tmp_path):
    """The check itself: a model module importing the scheduler is refused, as
    is run-time code importing scripts/ (files written inside the tree's
    layout, read with the same walker)."""
    fake = ROOT / "models" / "_layout_probe.py"
    fake.write_text("from ziggurat.actors.scheduler.engine import EngineCore\n"
                    "from ..actors.ingress import server\n"
                    "from ziggurat.scripts import bench_gpu\n")
    try:
        found = violations([fake])
    finally:
        fake.unlink()
    assert len(found) == 3, found
    assert "models layer imports 'actors.scheduler.engine' from the scheduler layer" in found[0]
    assert "'actors.ingress.server' from the entry layer" in found[1]
    assert "imports scripts/" in found[2]


_NO_RAY = """
import importlib, sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("ray is not importable in this test")
sys.meta_path.insert(0, _Block())
failed = []
for m in sys.argv[1:]:
    try:
        importlib.import_module(m)
    except ImportError as e:
        failed.append(f"{m}: {e}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def _import_without_ray(modules):
    return subprocess.run([sys.executable, "-c", _NO_RAY, *modules], capture_output=True, text=True, timeout=120)


def test_ray_free_modules_import_without_ray():
    r = _import_without_ray(RAY_FREE)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_no_ray_check_catches_a_ray_import():
    r = _import_without_ray(["ziggurat.actors.scheduler.actor"])  # the actor shell imports ray, as it should
    assert r.returncode == 1 and "ray is not importable" in r.stdout, r.stdout + r.stderr
