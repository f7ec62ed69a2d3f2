"""The package's layers: the library never imports the application, no module imports itself back through
another, each engine is a subpackage of role modules whose engine internals sit in its compatibility module, and
importing the library with a backend pulls in no application dependency."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "scaling_plugins"
APP = "scaling_plugins.app"
# Private members of the engines that only the compatibility modules may name.
ENGINE_INTERNALS = {
    "deepspeed": ("_get_norm_groups", "scaled_global_norm", "_get_gradients_for_reduction", "get_grads_for_reduction",
                  "basic_optimizer", "gradient_average", "lr_schedules", "_getframe", "bit16_groups", "micro_steps",
                  "_configure_optimizer", "client_lr_scheduler", "load_ds_config", "TorchBackend", "_get_default_group",
                  "_device_types", "_get_backend"),
    "horovod": ("_parameter_names", "_compression", "_group_counts", "_should_synchronize", "_synchronized",
                "get_handler_registry", "OptimizerStateHandler", "_DistributedOptimizer",
                "_DistributedAdasumOptimizer"),
    "fsdp": ("_get_fsdp_state", "_fsdp_param_groups", "_reduce_scatter_comm", "fsdp_params", "sharded_param",
             "mp_policy", "gradient_divide_factor", "ReduceScatter", "DefaultReduceScatter",
             "_get_gradient_divide_factors", "FSDPMeshInfo", "DDPMeshInfo", "_reduce_scatter_process_group",
             "_all_reduce_process_group", "force_sum_reduction_for_comms"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every scaling_plugins module ``path`` imports, at module level or inside functions."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found.update(c for c in candidates if c.startswith("scaling_plugins") and module_exists(c))
    found.discard(name)
    return found


def module_exists(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


GRAPH = {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def test_the_library_never_imports_the_application():
    offenders = {m: sorted(i for i in deps if i == APP or i.startswith(APP + "."))
                 for m, deps in GRAPH.items() if not (m == APP or m.startswith(APP + "."))}
    assert {m: deps for m, deps in offenders.items() if deps} == {}


def test_no_import_cycles_between_modules():
    """Package ``__init__`` modules only re-export, so edges into a package are not followed through it."""
    graph = {m: {d for d in deps if not (PACKAGE.parent / Path(*d.split(".")) / "__init__.py").exists()}
             for m, deps in GRAPH.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep] if dep in path else [node, dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


BACKENDS = PACKAGE / "backends"
ROLE_MODULES = {"ddp": {"driver", "harvest"},
                "fsdp": {"compat", "driver", "harvest"},
                "deepspeed": {"compat", "driver", "harvest"},
                "horovod": {"compat", "driver", "elastic", "harvest", "optimizer"}}


def test_each_engine_is_a_subpackage_of_role_modules_beside_the_shared_pieces():
    """One subpackage per engine, its modules named by role; what they share in ``backends.shared``; nothing else."""
    found = {path.name: {m.stem for m in path.glob("*.py") if m.stem != "__init__"}
             for path in BACKENDS.iterdir() if path.is_dir() and (path / "__init__.py").exists()}
    assert found.pop("shared") == {"driver", "fused_norms", "grad_scaler", "versions", "wide_payload"}
    assert found == ROLE_MODULES
    assert sorted(p.name for p in BACKENDS.glob("*.py")) == ["__init__.py"]


@pytest.mark.parametrize("engine", sorted(ENGINE_INTERNALS))
def test_engine_internals_only_in_the_compatibility_module(engine):
    compat = BACKENDS / engine / "compat.py"
    assert compat.exists()
    offenders = {}
    for path in BACKENDS.rglob("*.py"):
        if path == compat:
            continue
        tree = ast.parse(path.read_text())
        names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                 and not (isinstance(n.value, ast.Name) and n.value.id == "compat")}   # compat's own functions
        names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        used = sorted(names & set(ENGINE_INTERNALS[engine]))
        if used:
            offenders[str(path.relative_to(BACKENDS))] = used
    assert offenders == {}


def test_an_engine_never_imports_another_engine():
    """Each engine's subpackage imports only itself, ``backends.shared`` and the core."""
    offenders = {}
    for module, deps in GRAPH.items():
        parts = module.split(".")
        if parts[:2] != ["scaling_plugins", "backends"] or len(parts) < 3 or parts[2] == "shared":
            continue
        others = sorted(d for d in deps if d.startswith("scaling_plugins.backends.")
                        and d.split(".")[2] not in (parts[2], "shared"))
        if others:
            offenders[module] = others
    assert offenders == {}


def class_table() -> dict[str, tuple[list[str], set[str], set[str]]]:
    """Every class in the package by name: (its base names, its methods, the ``self.<name>(...)`` calls of its
    ``__init__``)."""
    table = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef):
                continue
            methods = {n.name: n for n in node.body if isinstance(n, ast.FunctionDef)}
            init = methods.get("__init__")
            calls = {n.func.attr for n in ast.walk(init) if isinstance(n, ast.Call)
                     and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name)
                     and n.func.value.id == "self"} if init else set()
            table[node.name] = ([getattr(b, "id", getattr(b, "attr", "")) for b in node.bases], set(methods), calls)
    return table


def test_no_constructor_of_a_base_class_calls_an_overridable_method():
    """A base class's ``__init__`` runs before its subclass has set its fields, so it calls none of the public
    (overridable) methods of its own class or its bases on ``self``; it calls its own explicitly
    (``PolicyDriver.apply_learning_rate(self)``) where it must."""
    table = class_table()
    subclassed = {base for bases, _, _ in table.values() for base in bases}

    def public_methods(name: str) -> set[str]:
        bases, methods, _ = table.get(name, ([], set(), set()))
        return {m for m in methods if not m.startswith("_")}.union(*(public_methods(b) for b in bases))

    offenders = {name: sorted(calls & public_methods(name)) for name, (_, _, calls) in table.items()
                 if name in subclassed and calls & public_methods(name)}
    assert offenders == {}


ENGINE_MODULES = {"ddp": "torch.distributed", "deepspeed": "deepspeed", "fsdp": "torch.distributed.fsdp",
                  "horovod": "horovod.torch"}


@pytest.mark.parametrize("backend", sorted(ENGINE_MODULES))
def test_importing_the_library_and_a_backend_pulls_no_application_dependency(backend):
    """What torch and the engine import by themselves (torch.hub takes tqdm when it is installed) is theirs;
    nothing heavy may be added by the library."""
    code = ("import sys, importlib\n"
            f"importlib.import_module({ENGINE_MODULES[backend]!r})\n"
            "heavy = ('matplotlib', 'sklearn', 'tqdm', 'transformers', 'accelerate', 'scaling_plugins.app')\n"
            "before = {m for m in heavy if m in sys.modules}\n"
            f"import scaling_plugins, scaling_plugins.backends.{backend}\n"
            "added = sorted(m for m in heavy if m in sys.modules and m not in before)\n"
            "print(added); sys.exit(1 if added else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_hugging_face_integration_is_imported_only_when_asked_for():
    """``scaling_plugins.integrations`` imports nothing; without transformers, the integration module says how to
    install the extra."""
    code = ("import sys\n"
            "import scaling_plugins, scaling_plugins.integrations\n"
            "assert 'transformers' not in sys.modules and 'accelerate' not in sys.modules, 'imported eagerly'\n"
            "sys.modules['transformers'] = None\n"
            "try:\n"
            "    import scaling_plugins.integrations.huggingface\n"
            "except ImportError as err:\n"
            "    print(err)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "pip install 'scaling_plugins[hf]'" in proc.stdout


def test_an_unsupported_deepspeed_version_is_refused_by_name():
    pytest.importorskip("deepspeed")
    from scaling_plugins.backends.deepspeed import compat as deepspeed_compat

    with pytest.raises(ImportError, match=r"deepspeed 0\.18\.2 is not supported by scaling_plugins \(supported: "
                                          r"0\.19\.x; verified on 0\.19\.8\)"):
        deepspeed_compat.check_version("0.18.2")


def test_an_unsupported_horovod_version_is_refused_by_name(monkeypatch):
    horovod = pytest.importorskip("horovod")
    pytest.importorskip("horovod.torch")
    from scaling_plugins.backends.horovod import compat as horovod_compat

    monkeypatch.setattr(horovod, "__version__", "0.27.0")
    horovod_compat.horovod_torch.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"horovod 0\.27\.0 is not supported by scaling_plugins \(supported: "
                                              r"0\.28\.x; verified on 0\.28\.1\)"):
            horovod_compat.horovod_torch()
    finally:
        horovod_compat.horovod_torch.cache_clear()
