"""Importing a script of this repository creates or changes no file (STYLE.md 1 and 14)."""

import json
import os
import subprocess
import sys

import pytest

import miyawaki_dataset_loader as L

# in import order, so that each import runs only the module's own top level
MODULES = ["miyawaki_dataset_loader", "miyawaki_dual_encoder", "miyawaki_generative_backend",
           "miyawaki_evaluation"]

# Run in one fresh interpreter: import the modules (argv[1], comma-separated) one by one and,
# around each import, list the watched folders (argv[2:]): entry names, files with their mtime.
# Prints {module: [folders whose listing that import changed]}.
CHILD = """
import importlib, json, sys
from pathlib import Path

def listing(folders):
    return [sorted([p.name, p.stat().st_mtime_ns if p.is_file() else None] for p in d.iterdir())
            if d.is_dir() else None for d in folders]

folders, changed = [Path(p) for p in sys.argv[2:]], {}
for name in sys.argv[1].split(","):
    before = listing(folders)
    importlib.import_module(name)
    changed[name] = [str(d) for d, a, b in zip(folders, before, listing(folders)) if a != b]
print(json.dumps(changed))
"""


@pytest.fixture(scope="module")
def changed_by_import(tmp_path_factory) -> dict:
    """{module: folders its import changed}, from a single child process run in an empty folder."""
    cwd = tmp_path_factory.mktemp("import")
    watched = [cwd, L.REPO_DIR, L.DEFAULT_OUT, L.DEFAULT_DATA.parent]
    env = {**os.environ, "PYTHONPATH": str(L.REPO_DIR), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, ",".join(MODULES), *map(str, watched)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.xdist_group("imports_changed")   # shares a module fixture: one test process (make test)
@pytest.mark.parametrize("module", MODULES)
def test_import_creates_no_files(module, changed_by_import):
    assert changed_by_import[module] == []


def test_every_script_option_has_help_and_shows_its_default(monkeypatch):
    """One config style: each script's options are dataclass fields with help (add_config_args),
    and ``--help`` shows every option's help and its default, but for the empty ones (None, ""),
    whose help says what they stand for: no "(default: None)" or "(default: )"."""
    import argparse
    import dataclasses

    import miyawaki_dual_encoder as D
    import miyawaki_evaluation as E
    import miyawaki_generative_backend as G
    for module, cls in ((L, L.LoaderConfig), (D, D.ScriptConfig), (E, E.EvaluationConfig),
                        (G, G.GenerativeConfig)):
        monkeypatch.setattr(module, "parse_config", lambda parser, config_cls, argv: parser)
        parser = module.parse_args([])
        assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
        helps = {a.dest: a.help for a in parser._actions}
        for f in dataclasses.fields(cls):
            assert helps.get(f.name), f"{cls.__name__}.{f.name}: no --help text"
        text = " ".join(parser.format_help().split())
        assert "(default: None)" not in text and "(default: )" not in text
        assert "(default: auto)" in text                 # --device, as every other default


def test_scripts_import_only_the_loader_and_the_dual_encoder_at_the_top():
    """The house's import graph: no script imports another script at module level except the
    loader and the dual encoder (the benchmark loads the decoders inside --generative)."""
    import ast
    from pathlib import Path
    allowed = {"miyawaki_dataset_loader", "miyawaki_dual_encoder"}
    for name in MODULES:
        tree = ast.parse((Path(L.__file__).parent / f"{name}.py").read_text())
        imported = {n.module for n in tree.body if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
        project = {m for m in imported if m and m.startswith("miyawaki_")}
        assert project <= allowed - {name}, f"{name} imports {sorted(project - allowed)}"


@pytest.mark.parametrize("name", ["tune_dual_encoder", "tune_decoders", "tune_anchor", "pipeline_speed",
                                  "profile_dual_encoder", "gpu_check"])
def test_every_benchmark_option_has_help_and_shows_its_default(name, monkeypatch):
    """The benchmark scripts' --help, as the scripts': every option says what it is and shows its
    default (many showed a bare "--seeds SEEDS [SEEDS ...]"), none shows "(default: None)"."""
    import argparse
    import importlib
    sys.path.insert(0, str(L.REPO_DIR / "benchmarks"))
    module = importlib.import_module(name)

    class Parsed(Exception):
        pass

    def capture(parser, *args, **kwargs):
        raise Parsed(parser)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(Parsed) as parsed:
        module.main([])
    parser = parsed.value.args[0]
    assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
    for action in parser._actions:
        assert action.help, f"{name} {action.option_strings}: no --help text"
    text = " ".join(parser.format_help().split())
    assert "(default: None)" not in text and "(default: )" not in text
