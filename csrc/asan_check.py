"""Run the extension's CPU tests against an AddressSanitizer build (the installed build is untouched).

    python csrc/asan_check.py [extra pytest arguments]

Builds the CPU ops with ``-fsanitize=address`` into a temporary directory, lays a copy of the
``nern_fast`` package and the tests next to it with the ASan library as ``nern_fast/_C``, and runs
``tests/test_csrc.py`` and ``tests/test_permutations.py`` there with the ASan runtime preloaded (leak detection off: CPython and torch
keep allocations alive at exit on purpose). Exit status: pytest's (non-zero on any ASan report,
which aborts the process).
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SANITIZE = "-fsanitize=address -fno-omit-frame-pointer -g"
# Slow under ASan or not about memory safety: the child-process ISA comparison and torch.compile.
DESELECT = "not portable_passes and not torch_compile"
# The tests of every CPU op of the extension: decode (test_csrc) and the permutation chains.
TEST_FILES = ("tests/test_csrc.py", "tests/test_permutations.py")


def gcc_library(name: str) -> str:
    path = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True,
                          check=True).stdout.strip()
    if not os.path.isabs(path) or not os.path.exists(path):
        raise SystemExit(f"asan_check: gcc has no {name} (install gcc's sanitizer runtime)")
    return os.path.realpath(path)


def asan_preload() -> str:
    """The ASan runtime first, then libstdc++ (python itself does not link it; without it ASan
    cannot find the real __cxa_throw when an extension throws)."""
    return f"{gcc_library('libasan.so')} {gcc_library('libstdc++.so')}"


def main(argv: list[str]) -> int:
    work = Path(tempfile.mkdtemp(prefix="nern_fast_asan_"))
    env = dict(os.environ, NERN_FAST_NO_CUDA="1", CFLAGS=SANITIZE, LDFLAGS="-fsanitize=address")
    print(f"asan_check: building the ASan copy in {work}", flush=True)
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(work / "lib"),
                    "--build-temp", str(work / "build")], cwd=REPO, env=env, check=True)
    built = glob.glob(str(work / "lib" / "nern_fast" / "_C*.so"))
    if not built:
        raise SystemExit("asan_check: the ASan build produced no library (see the warnings above)")
    shutil.copytree(REPO / "nern_fast", work / "pkg" / "nern_fast",
                    ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    shutil.copytree(REPO / "kernels", work / "pkg" / "nern_fast" / "kernels",
                    ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    shutil.copy(built[0], work / "pkg" / "nern_fast" / Path(built[0]).name)
    shutil.copytree(REPO / "tests", work / "pkg" / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", work / "pkg" / "pyproject.toml")
    run_env = dict(os.environ, LD_PRELOAD=asan_preload(), PYTHONPATH=str(work / "pkg"),
                   ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:allocator_may_return_null=1")
    where = subprocess.run([sys.executable, "-c", "import nern_fast._C as c; print(c.__file__)"],
                           cwd=work / "pkg", env=run_env, capture_output=True, text=True)
    if where.returncode != 0 or str(work) not in where.stdout:
        raise SystemExit(f"asan_check: the child does not load the ASan copy ({where.stdout.strip()} "
                         f"{where.stderr.strip()[-300:]})")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TEST_FILES,
               "-k", DESELECT, *argv]
    print(f"asan_check: {' '.join(command)} (LD_PRELOAD={run_env['LD_PRELOAD']})", flush=True)
    done = subprocess.run(command, cwd=work / "pkg", env=run_env)
    print(f"asan_check: pytest exit status {done.returncode}", flush=True)
    return done.returncode


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
