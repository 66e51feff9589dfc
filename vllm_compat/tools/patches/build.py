"""``vllm-compat patches build --out DIR``: the series in patches/ regenerated from recipes.

The series are exported, never edited by hand (Debian's ``gbp pq`` model). For each version,
a scratch git repository gets the released files the recipes touch (the PyPI sdist, cached;
see :func:`released_source`), one commit per fix (its recipe applied; its message; a fixed
author and date) and ``git format-patch --zero-commit --no-signature`` writes the series.
Building again from the same inputs gives the same bytes, which tests/tools/test_patches.py
checks against the committed patches/.

Inputs, all in the repository:

- ``vllm_compat/tools/vllm_compat/tools/patches/recipes/series.in``: the series file, ``{version}`` filled in; its names are
  the fixes, in application order.
- ``vllm_compat/tools/vllm_compat/tools/patches/recipes/<fix>.message``: the commit message (subject line, blank line, the
  Why / What / Upstream status / Drop when / Shim equivalent / Depends on paragraphs); the
  same for every version.
- ``vllm_compat/tools/vllm_compat/tools/patches/recipes/<version>/<fix>.edits``: exact edits of that release's files, applied
  after the fixes before it. Blocks of ``@@@ edit PATH`` / old lines / ``@@@ into`` / new
  lines / ``@@@ end``; the old lines must occur exactly once in the file. ``@@@ generate
  PATH`` writes a generated file (below). Lines outside blocks: blank or ``#`` comments.
- the new module vllm/v1/sample/ops/v0_sampling.py is generated from the shim's own
  vllm_compat/v0_sampling.py and vllm_compat/v0_draw.py (the code verbatim, the imports
  merged) followed by ``vllm_compat/tools/vllm_compat/tools/patches/recipes/v0_sampling_vllm.py``, the functions vLLM's sampler
  and model runner call; so there is one copy of V0's sampling, the shim's.
"""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import PATCHES_DIR, PatchError, _extract, released_source
from ...golden.fixtures import PACKAGE_ROOT

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"  # inputs; patches/ holds only the output
V0_SAMPLING_MODULE = "vllm/v1/sample/ops/v0_sampling.py"
SHIM_MODULES = ("v0_sampling.py", "v0_draw.py")  # in PACKAGE_ROOT, in this order
VLLM_SIDE = "v0_sampling_vllm.py"  # in RECIPES_DIR

# Fixed identity and date: the commits, hence the patch files, depend only on their content.
_GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "vllm-compat", "GIT_AUTHOR_EMAIL": "vllm-compat@users.noreply.github.com",
    "GIT_COMMITTER_NAME": "vllm-compat", "GIT_COMMITTER_EMAIL": "vllm-compat@users.noreply.github.com",
    "GIT_AUTHOR_DATE": "2026-11-25T00:00:00+0000", "GIT_COMMITTER_DATE": "2026-11-25T00:00:00+0000",
}
# No user or system configuration (diff.algorithm, format.signature, ...) may change the output.
_GIT_ISOLATED = {"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull}


@dataclass(frozen=True)
class Edit:
    path: str
    old: str
    new: str


@dataclass(frozen=True)
class Generate:
    path: str


def read_edits(path: Path) -> list[Edit | Generate]:
    """Parse a ``.edits`` file (format in the module docstring)."""
    steps: list[Edit | Generate] = []
    lines = path.read_text().splitlines(keepends=True)
    i = 0
    while i < len(lines):
        line, where = lines[i], f"{path}:{i + 1}"
        i += 1
        if line.startswith("@@@ generate "):
            steps.append(Generate(line.split(" ", 2)[2].strip()))
        elif line.startswith("@@@ edit "):
            target = line.split(" ", 2)[2].strip()
            parts: list[list[str]] = [[]]
            while True:
                if i == len(lines):
                    raise PatchError(f"{where}: no '@@@ end' for this edit")
                line = lines[i]
                i += 1
                if line == "@@@ into\n" and len(parts) == 1:
                    parts.append([])
                elif line == "@@@ end\n" and len(parts) == 2:
                    break
                elif line.startswith("@@@"):
                    raise PatchError(f"{path}:{i}: unexpected {line.strip()!r}")
                else:
                    parts[-1].append(line)
            old, new = ("".join(p) for p in parts)
            if not old:
                raise PatchError(f"{where}: an edit needs old lines to anchor it")
            steps.append(Edit(target, old, new))
        elif line.strip() and not line.startswith("#"):
            raise PatchError(f"{where}: expected '@@@ edit PATH' or '@@@ generate PATH', got {line.strip()!r}")
    return steps


def apply_edit(edit: Edit, root: Path, recipe: Path) -> None:
    file = root / edit.path
    if not file.is_file():
        raise PatchError(f"{recipe}: {edit.path} is not in the release")
    text = file.read_text()
    found = text.count(edit.old)
    if found != 1:  # anchored: an edit that matches twice (or not at all) is ambiguous
        first = edit.old.splitlines()[0]
        raise PatchError(f"{recipe}: the edit of {edit.path} starting {first!r} matches {found} times, "
                         f"not once")
    file.write_text(text.replace(edit.old, edit.new))


# ---- the generated module ----------------------------------------------------------------

def _split_module(source: str, name: str) -> tuple[str, str | None, list[str], str]:
    """-> (the lines up to and with the docstring, the docstring, the import statements, the rest:
    from the line after the last import). Comments between docstring and imports are dropped: in
    v0_sampling_vllm.py they are notes about that file, not part of the module vLLM gets."""
    tree = ast.parse(source)
    body = tree.body
    doc = ast.get_docstring(tree)
    head_end = body[0].end_lineno if doc is not None else 0
    imports = []
    earlier = SHIM_MODULES[:SHIM_MODULES.index(name)] if name in SHIM_MODULES else ()
    rest_start = head_end
    for node in body[1 if doc is not None else 0:]:
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            break
        rest_start = node.end_lineno
        if isinstance(node, ast.ImportFrom) and node.level:
            if node.level == 1 and f"{node.module}.py" in earlier:
                continue  # names of a module placed earlier in the same generated module
            raise PatchError(f"{name}: a relative import cannot move into vLLM: {ast.unparse(node)}")
        imports.append(node)
    lines = source.splitlines(keepends=True)
    return ("".join(lines[:head_end]), doc, [ast.unparse(n) for n in imports],
            "".join(lines[rest_start:]).lstrip("\n"))


def _top_level_names(code: str) -> set[str]:
    names = set()
    for node in ast.parse(code).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


def _import_block(statements: list[str]) -> str:
    """Deduplicated, in groups: __future__, standard library, third party, vllm (isort's order)."""
    def group(stmt: str) -> int:
        top = stmt.split()[1].split(".")[0]
        return (0 if top == "__future__" else 1 if top in sys.stdlib_module_names
                else 3 if top == "vllm" else 2)

    unique = sorted(set(statements), key=lambda s: (group(s), s.startswith("from "), s))
    blocks: dict[int, list[str]] = {}
    for stmt in unique:
        blocks.setdefault(group(stmt), []).append(stmt)
    return "\n\n".join("\n".join(b) for _, b in sorted(blocks.items())) + "\n"


def v0_sampling_module(shim_dir: Path = PACKAGE_ROOT, recipes_dir: Path = RECIPES_DIR) -> str:
    """vLLM's v0_sampling.py: the vLLM-side header, the shim's modules, the vLLM-side functions."""
    head, _, imports, vllm_side = _split_module((recipes_dir / VLLM_SIDE).read_text(), VLLM_SIDE)
    sections = []
    defined: dict[str, str] = {}
    for module in [*SHIM_MODULES, VLLM_SIDE]:
        if module == VLLM_SIDE:
            code, title, doc = vllm_side, "called by vLLM's sampler and model runner", None
        else:
            _, doc, more, code = _split_module((shim_dir / module).read_text(), module)
            imports += more
            title = f"vllm_compat/{module}"
        for name in _top_level_names(code):  # one namespace now: a clash would silently rebind
            if name in defined:
                raise PatchError(f"{name} is defined in both {defined[name]} and {module}")
            defined[name] = module
        comment = "".join(f"# {ln}".rstrip() + "\n" for ln in doc.splitlines()) if doc else ""
        sections.append(f"# ---- {title} " + "-" * max(4, 80 - len(title)) + "\n" + comment
                        + "\n" + code.rstrip("\n") + "\n")
    notice = (f"# Generated by `vllm-compat patches build` from vllm-compat's vllm_compat/{SHIM_MODULES[0]}\n"
              f"# and vllm_compat/{SHIM_MODULES[1]}: edit those, not this file.\n")
    return head + notice + "\n" + _import_block(imports) + "\n\n" + "\n\n".join(sections)


# ---- the series ----------------------------------------------------------------------------

def recipe_versions(recipes_dir: Path = RECIPES_DIR) -> list[str]:
    found = [p.name for p in recipes_dir.iterdir() if any(p.glob("*.edits"))]  # not __pycache__ and the like
    return sorted(found, key=lambda v: tuple(int(x) for x in v.split(".")))


def _series_template(recipes_dir: Path) -> tuple[str, list[str]]:
    text = (recipes_dir / "series.in").read_text()
    names = [ln.split("#")[0].strip() for ln in text.splitlines()]
    return text, [n.removesuffix(".patch") for n in names if n]


def _git(repo: Path, *args: str, stdin: str | None = None) -> str:
    env = {**os.environ, **_GIT_IDENTITY, **_GIT_ISOLATED}
    env.pop("GIT_DIR", None)
    r = subprocess.run(["git", "-c", "init.defaultBranch=main", *args], cwd=repo, env=env, input=stdin,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise PatchError(f"git {' '.join(args)} failed in {repo}:\n{r.stderr.strip()}")
    return r.stdout


def build_version(version: str, out: Path, recipes_dir: Path = RECIPES_DIR,
                  shim_dir: Path = PACKAGE_ROOT) -> list[Path]:
    """Write ``out/<version>/``: the series file and one patch per fix. Returns the patch files."""
    template, fixes = _series_template(recipes_dir)
    recipes = {fix: recipes_dir / version / f"{fix}.edits" for fix in fixes}
    steps = {fix: read_edits(path) for fix, path in recipes.items()}
    released = {s.path for fix_steps in steps.values() for s in fix_steps if isinstance(s, Edit)}
    archive = released_source(version)
    with tempfile.TemporaryDirectory(prefix="vllm-compat-build-") as tmp:
        repo, exported = Path(tmp) / "src", Path(tmp) / "out"
        _extract(archive, version, released, repo)
        _git(repo, "init", "-q")
        _git(repo, "add", "-A")
        _git(repo, "commit", "-q", "-m", f"vLLM {version}: the released files the series edits")
        for fix in fixes:
            for step in steps[fix]:
                if isinstance(step, Generate):
                    if step.path != V0_SAMPLING_MODULE:
                        raise PatchError(f"{recipes[fix]}: no generator for {step.path}")
                    (repo / step.path).parent.mkdir(parents=True, exist_ok=True)
                    (repo / step.path).write_text(v0_sampling_module(shim_dir, recipes_dir))
                else:
                    apply_edit(step, repo, recipes[fix])
            _git(repo, "add", "-A")
            _git(repo, "commit", "-q", "--cleanup=whitespace", "-F", "-",
                 stdin=(recipes_dir / f"{fix}.message").read_text())
        _git(repo, "format-patch", "-q", "--zero-commit", "--no-signature", "--numbered-files",
             "-o", str(exported), f"HEAD~{len(fixes)}")
        dest = out / version
        dest.mkdir(parents=True, exist_ok=True)
        for stale in [*dest.glob("*.patch"), dest / "series"]:  # a fix dropped from series.in goes too
            stale.unlink(missing_ok=True)
        (dest / "series").write_text(template.replace("{version}", version))
        written = []
        for number, fix in enumerate(fixes, 1):
            written.append(Path(shutil.copyfile(exported / str(number), dest / f"{fix}.patch")))
    return written


def build(out: Path, versions: list[str] | None = None, **kwargs) -> dict[str, list[Path]]:
    return {v: build_version(v, Path(out), **kwargs) for v in (versions or recipe_versions())}
