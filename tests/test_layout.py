"""The house: the scripts, the training script's engine and the paper's modules at the root, support code in three
folders that import one way (training <- scoring <- deploy: export and int8 are an add-on nothing below imports), no module importing a script or the engine (but the
scripts), no import cycle, and the checkpoint dictionary written and read in training/checkpoint.py alone. Modules
are compared by full dotted name."""
import ast
from pathlib import Path

from helpers import ROOT

SCRIPTS = {"train_draem", "test_draem", "export_draem"}
ENGINE = "engine"  # train_draem.py's loop machinery, beside it as MAE's engine_pretrain.py: only scripts import it
PAPER = {"model_unet", "loss", "perlin", "data_loader", "recipe"}
# A folder may import the paper's modules, its own modules and the folders before it here, nothing after.
FOLDERS = ("training", "scoring", "deploy")


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Every library module and script by dotted name: the root's .py files and those of the folders."""
    files = {p.stem: p for p in root.glob("*.py")}
    for folder in FOLDERS:
        files |= {f"{folder}.{p.stem}": p for p in (root / folder).glob("*.py") if p.stem != "__init__"}
    return files


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The known modules a file imports, by full dotted name (`from training import checkpoint` is
    training.checkpoint; `from training.checkpoint import X` too); relative imports are refused."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.relative_to(ROOT)}: relative import (use the full dotted name)"
            candidates = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in candidates:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    files = module_files(root)
    graph = {name: imported_modules(path, set(files)) - {name} for name, path in files.items()}
    graph |= {f"benchmarks.{p.stem}": imported_modules(p, set(files)) for p in (root / "benchmarks").glob("*.py")}
    return graph


def room(module: str) -> str:
    return module.split(".")[0]


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports that run against the house's direction; empty when the layout holds."""
    bad = []
    for module, imported in graph.items():
        for other in imported:
            if room(other) in SCRIPTS:
                bad.append(f"{module} imports the script {other}")
            elif other == ENGINE and room(module) not in SCRIPTS | {"benchmarks"}:
                bad.append(f"{module} imports the engine, which only scripts may")
            elif module in PAPER and room(other) in FOLDERS:
                bad.append(f"{module} (a paper module) imports {other}")
            elif room(module) in FOLDERS and room(other) in FOLDERS and \
                    FOLDERS.index(room(other)) > FOLDERS.index(room(module)):
                bad.append(f"{module} imports {other}, from a folder above it")
    return bad


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path, or None."""
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> list[str] | None:
        if state.get(module) == "open":
            return path[path.index(module):] + [module]
        if state.get(module) == "done":
            return None
        state[module] = "open"
        for other in sorted(graph.get(module, ())):
            if found := visit(other, path + [module]):
                return found
        state[module] = "done"
        return None

    for module in sorted(graph):
        if found := visit(module, []):
            return found
    return None


def test_the_root_holds_the_scripts_and_the_paper_modules_and_the_folders_the_rest():
    assert {p.stem for p in ROOT.glob("*.py")} == SCRIPTS | PAPER | {ENGINE}
    for folder in FOLDERS:
        assert (ROOT / folder / "__init__.py").is_file()
    graph = import_graph()
    assert {"training.checkpoint", "deploy.export", "scoring.evaluate"} <= set(graph)  # the walk sees the folders


def test_imports_run_one_way_with_no_script_imported_and_no_cycle():
    graph = import_graph()
    assert layering_violations(graph) == []
    assert cycle(graph) is None
    # the scripts do stand on the folders: the check above is not vacuous
    assert {"training.settings", "scoring.results"} <= graph["train_draem"]
    assert "training.checkpoint" in graph["engine"]


def test_the_training_script_stands_on_few_modules():
    """A reader follows train_draem.py through at most 8 local modules and 30 imported names (the engine's and
    data_loader's functions are called by their module's name)."""
    files = module_files()
    modules = imported_modules(ROOT / "train_draem.py", set(files))
    names = 0
    for node in ast.parse((ROOT / "train_draem.py").read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module.split(".")[0] in {m.split(".")[0] for m in files}:
            names += len(node.names)
        elif isinstance(node, ast.Import):
            names += sum(a.name in files for a in node.names)
    assert len(modules) <= 8 and names <= 30, (sorted(modules), names)


def test_the_checks_catch_a_bad_import_in_a_folder_module(tmp_path):
    """A copy of the tree with one deliberate bad import each time: the checks above must name it."""
    def tree_with(path: str, line: str) -> dict[str, set[str]]:
        for source in list(ROOT.glob("*.py")) + [p for f in FOLDERS + ("benchmarks",) for p in (ROOT / f).glob("*.py")]:
            target = tmp_path / source.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(source.read_text())
        (tmp_path / path).write_text((ROOT / path).read_text() + f"\n{line}\n")
        return import_graph(tmp_path)

    assert layering_violations(tree_with("training/demo.py", "import train_draem")) == \
        ["training.demo imports the script train_draem"]
    assert layering_violations(tree_with("scoring/report.py", "from engine import Run")) == \
        ["scoring.report imports the engine, which only scripts may"]
    assert layering_violations(tree_with("scoring/metrics.py", "from deploy import export")) == \
        ["scoring.metrics imports deploy.export, from a folder above it"]
    assert layering_violations(tree_with("perlin.py", "from training.settings import run_name")) == \
        ["perlin (a paper module) imports training.settings"]
    found = cycle(tree_with("training/files.py", "from training.checkpoint import ModelInfo"))
    assert found is not None and {"training.files", "training.checkpoint"} <= set(found)


CHECKPOINT_KEYS = ('"reconstructive"', '"discriminative"', '"optimizer"', '"scaler"')


def test_the_checkpoint_dict_is_written_and_read_in_training_checkpoint_py_only():
    files = module_files() | {f"benchmarks.{p.stem}": p for p in (ROOT / "benchmarks").glob("*.py")}
    assert "training.checkpoint" in files
    for name, path in files.items():
        if name == "training.checkpoint":
            continue
        text = path.read_text()
        assert not [k for k in CHECKPOINT_KEYS if f"[{k}]" in text or f"{k}:" in text], name
        assert "torch.save(" not in text and "torch.load(" not in text, name


def record_classes(path: Path) -> list[str]:
    """The dataclasses and NamedTuples a file defines."""
    def is_record(node: ast.ClassDef) -> bool:
        decorators = [d.func if isinstance(d, ast.Call) else d for d in node.decorator_list]
        return any(getattr(d, "id", None) == "dataclass" for d in decorators) or \
            any(getattr(b, "id", None) == "NamedTuple" for b in node.bases)
    return [n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef) and is_record(n)]


def parameter_count(node: ast.FunctionDef) -> int:
    a = node.args
    names = [*a.posonlyargs, *a.args, *a.kwonlyargs, *filter(None, (a.vararg, a.kwarg))]
    return len([n for n in names if n.arg not in ("self", "cls")])


def test_few_records_and_short_signatures():
    """Library code (the paper's modules, the engine and the folders) defines at most 12 dataclasses and
    NamedTuples, each a thing a reader names; no function anywhere but the tests takes more than 7 parameters."""
    library = {name: path for name, path in module_files().items() if name not in SCRIPTS}
    records = {f"{name}.{cls}" for name, path in library.items() for cls in record_classes(path)}
    assert len(records) <= 12, sorted(records)
    assert {"model_unet.DraemOutput", "training.checkpoint.ModelInfo"} <= records  # the walk sees them
    programs = list(module_files().values()) + list((ROOT / "benchmarks").glob("*.py"))
    long = [f"{path.relative_to(ROOT)}:{node.name} ({parameter_count(node)})" for path in programs
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and parameter_count(node) > 7]
    assert long == []
