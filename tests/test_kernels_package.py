"""The repository does not shadow Hugging Face's `kernels` package.

transformers >= 5.25 imports that package (`from kernels import CUDAProperties`, and more when it is installed).
A script run from the repository has the repository first on sys.path, so a kernels.py there (this project's expert
kernels used to be one) hid the real package and broke the import of transformers. The expert kernels are
moe_kernels.py now; these tests keep that name free: no module of that name on any path the scripts and tests put
first, and a `kernels` package on PYTHONPATH is the one imported beside model, generate, bench and transformers.
"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("model", "generate", "bench")  # what the command lines and the GPU runner import first

# run in a fresh interpreter whose cwd is the repository: `python -c` puts the cwd first on sys.path, as
# `python generate.py` puts the script's folder first
IMPORTS = f"""
import {", ".join(SCRIPTS)}
import transformers
from kernels import CUDAProperties
import kernels
print(kernels.__file__)
"""


def inside_repository(path):
    return os.path.commonpath([ROOT, os.path.abspath(path)]) == ROOT


def env_with_pythonpath(*folders):
    """The test's environment with `folders` first on PYTHONPATH and no entry that points into the repository
    (so only the cwd puts the repository on sys.path, as for a script run there); the built-in checkpoints go to
    the tests' cache."""
    kept = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
            if p and not inside_repository(p)]
    return dict(os.environ, PYTHONPATH=os.pathsep.join([*map(str, folders), *kept]))


def import_in_repository(env):
    """The file `kernels` resolves to when imported after model, generate, bench and transformers, in a process
    whose cwd is the repository."""
    out = subprocess.run([sys.executable, "-c", IMPORTS], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def folders_on_sys_path():
    """The repository and each of its folders that hold scripts but are no package (tests/, benchmarks/): running a
    script there, or pytest (conftest.py), puts that folder first on sys.path."""
    folders = [ROOT]
    for name in sorted(os.listdir(ROOT)):
        path = os.path.join(ROOT, name)
        if (os.path.isdir(path) and not name.startswith(".") and not os.path.isfile(os.path.join(path, "__init__.py"))
                and any(f.endswith(".py") for f in os.listdir(path))):
            folders.append(path)
    return folders


def test_no_module_named_kernels_on_the_repository_paths():
    folders = folders_on_sys_path()
    assert os.path.join(ROOT, "tests") in folders and os.path.join(ROOT, "benchmarks") in folders
    # kernels.py, a kernels/ folder (a package, or a namespace package even without __init__.py), a compiled
    # kernels.*.so or a stray kernels.pyc
    clashes = [os.path.relpath(os.path.join(folder, name), ROOT) for folder in folders for name in os.listdir(folder)
               if name.split(".")[0] == "kernels"]
    assert clashes == [], f"these would shadow Hugging Face's kernels package: {clashes}"
    assert os.path.isfile(os.path.join(ROOT, "moe_kernels.py"))


def test_a_kernels_package_on_the_path_is_the_one_imported(tmp_path):
    """A stand-in for the real package (kernels/__init__.py defining CUDAProperties) on PYTHONPATH: importing the
    scripts and transformers from the repository leaves `from kernels import CUDAProperties` working, from it."""
    package = tmp_path / "site" / "kernels"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('class CUDAProperties:\n    """stand-in for the hub package"""\n')
    env = env_with_pythonpath(tmp_path / "site")
    env["MODES_CACHE"] = str(tmp_path / "cache")
    assert import_in_repository(env) == str(package / "__init__.py")


def test_the_installed_kernels_package_is_not_shadowed(tmp_path):
    """The same with Hugging Face's real package, where it is installed (it is no requirement of this project)."""
    env = env_with_pythonpath()
    probe = subprocess.run([sys.executable, "-c", "import kernels; from kernels import CUDAProperties; "
                            "print(kernels.__file__)"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    if probe.returncode != 0:
        pytest.skip("Hugging Face's kernels package is not installed (or does not import here)")
    installed = probe.stdout.strip().splitlines()[-1]
    assert not inside_repository(installed)
    env["MODES_CACHE"] = str(tmp_path / "cache")
    assert import_in_repository(env) == installed
