"""Fix records, selection parsing and apply(): the only place that changes vLLM.

A fix is a small record (what, why, how, upstream status, when to remove it, supported
vLLM range) with two optional hooks:
  * ``patch(patcher)``: class-level patches, made through ``Patcher`` so they can be
    reverted (tests flip between stock V1 and the shim in one process);
  * ``configure(engine_args)``: adjust ``EngineArgs`` before the engine config is built
    (runs in the process that builds the config: LLM / AsyncLLM / `vllm serve`).

``apply()`` records what is active in this process and exports it in ``VLLM_COMPAT_ACTIVE``
so the ``vllm.general_plugins`` entry point re-applies the same set in vLLM's engine-core
and worker processes.
"""
from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from . import versions

logger = logging.getLogger("vllm_compat")

ENV_REQUEST = "VLLM_COMPAT"         # user: "all" (default), "off", "a,b", "-a"
ENV_ACTIVE = "VLLM_COMPAT_ACTIVE"   # exported: exact comma list applied in the parent


class InternalsMoved(RuntimeError):
    """A patch target is missing or has an unexpected signature: vLLM changed under us."""


@dataclass(frozen=True)
class Fix:
    name: str
    summary: str
    why: str
    how: str
    upstream: str
    remove_when: str
    supported: str = str(versions.SUPPORTED)
    patch: Callable[["Patcher"], None] | None = None
    configure: Callable[[Any], None] | None = None
    default: bool = True
    requires: tuple[str, ...] = ()  # fixes it builds on: without them it is skipped (with the reason)

    def supports(self, v) -> bool:
        from packaging.specifiers import SpecifierSet

        return v in SpecifierSet(self.supported)


class Patcher:
    """Records every attribute it replaces so the owning fix can be reverted (and, for a
    rollback, re-made with the same objects)."""

    def __init__(self) -> None:
        self.saved: list[tuple[Any, str, Any, Any]] = []  # (owner, attr, original, patched)
        self.undone: list[tuple[Any, str, Any, Any]] = []  # what the last revert() undid

    def replace(self, owner: Any, attr: str, new: Any, *, expect_params: Iterable[str] | None = None) -> Any:
        """Replace ``owner.attr`` after checking it exists (and, for functions, that it takes
        ``expect_params``); returns the original."""
        if not hasattr(owner, attr):
            raise InternalsMoved(f"{_qual(owner)}.{attr} not found")
        original = getattr(owner, attr)
        if expect_params is not None:
            try:
                params = set(inspect.signature(original).parameters)
            except (TypeError, ValueError) as e:
                raise InternalsMoved(f"{_qual(owner)}.{attr}: no signature ({e})") from None
            missing = set(expect_params) - params
            if missing:
                raise InternalsMoved(f"{_qual(owner)}.{attr} lacks parameters {sorted(missing)}")
        self.saved.append((owner, attr, vars(owner).get(attr, _MISSING), new))
        setattr(owner, attr, new)
        return original

    def revert(self) -> None:
        for owner, attr, original, _ in reversed(self.saved):
            if original is _MISSING:
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)
        self.undone, self.saved = self.saved, []

    def redo(self) -> None:
        """Re-make, in order, the patches the last revert() undid: the same objects again."""
        for owner, attr, _, new in self.undone:
            self.saved.append((owner, attr, vars(owner).get(attr, _MISSING), new))
            setattr(owner, attr, new)
        self.undone = []


_MISSING = object()


def _qual(owner: Any) -> str:
    return getattr(owner, "__qualname__", None) or getattr(owner, "__name__", repr(owner))


@dataclass
class _State:
    active: dict[str, Patcher] = field(default_factory=dict)  # fix name -> its patches
    skipped: dict[str, str] = field(default_factory=dict)     # fix name -> reason
    engine_hook: Patcher | None = None
    plugin_loaded: bool = False
    warned_unverified: set = field(default_factory=set)  # releases warned about (versions.VERIFIED)


FIXES: dict[str, Fix] = {}
_state = _State()


def register(fix: Fix) -> Fix:
    FIXES[fix.name] = fix
    return fix


def defaults() -> list[str]:
    return [n for n, f in FIXES.items() if f.default]


def parse_selection(text: str | None) -> list[str]:
    """``all`` (default fixes), ``off``/``none``, or a comma list: ``name`` adds, ``-name``
    removes; a list of removals only starts from the defaults. Unknown names: ValueError."""
    text = (text or "all").strip()
    if text.lower() in ("off", "none", "0", "false"):
        return []
    tokens = [t.strip() for t in text.split(",") if t.strip()]
    only_removals = all(t.startswith("-") for t in tokens)
    chosen = set(defaults()) if only_removals else set()
    for t in tokens:
        name = t.lstrip("+-")
        if name == "all":
            chosen |= set(defaults())
            continue
        if name not in FIXES:
            raise ValueError(f"{ENV_REQUEST}: unknown fix {name!r}; known: {', '.join(FIXES)} (or all, off)")
        (chosen.discard if t.startswith("-") else chosen.add)(name)
    return [n for n in FIXES if n in chosen]


def apply(include: Iterable[str] | None = None, exclude: Iterable[str] = (), strict: bool = True) -> dict:
    """Make exactly the selection active in this process (default: the default fixes).

    Idempotent; fixes leaving the selection are reverted. Unsupported vLLM: raises
    UnsupportedVersion (strict) or warns and applies nothing. A supported release with no
    recorded green verify run (versions.VERIFIED): UnverifiedVersion (strict, unless
    VLLM_COMPAT_UNVERIFIED=warn) naming the nearest verified releases, or a warning and the
    fixes applied. A fix that fails to apply
    (targets moved) is skipped with a warning (strict=False), or (strict) the whole call is
    undone -- the previous selection active again, ENV_ACTIVE as it was -- and
    InternalsMoved("fix <name>: ...") raised from the fix's error. Change the selection
    only while no engine is running: patches are class-level."""
    wanted = list(defaults() if include is None else include)
    unknown = [n for n in list(wanted) + list(exclude) if n not in FIXES]
    if unknown:
        raise ValueError(f"unknown fix(es) {unknown}; known: {', '.join(FIXES)}")
    wanted = [n for n in FIXES if n in wanted and n not in set(exclude)]
    version = None
    if wanted:
        try:
            version = versions.require_supported()
        except versions.UnsupportedVersion:
            if strict:
                raise
            logger.warning("vllm-compat: unsupported vLLM %s; no fixes applied", versions.vllm_version())
            wanted, version = [], None
    if version is not None and not versions.is_verified(version):
        message = versions.unverified_message(version)
        if strict and not versions.unverified_allowed():
            raise versions.UnverifiedVersion(message)
        # Accepted here (strict=False): the engine processes this one starts apply the same selection
        # through the plugin, strictly; they inherit the decision instead of refusing the release.
        os.environ.setdefault(versions.ENV_UNVERIFIED, "warn")
        if version not in _state.warned_unverified:  # once per process
            _state.warned_unverified.add(version)
            logger.warning("%s", message)
    exported = os.environ.get(ENV_ACTIVE)
    try:
        _apply_selection(wanted, version, strict)
    except BaseException:
        # All or nothing: _apply_selection restored the previous selection; the engine hook
        # follows it and engine processes are told nothing new.
        _sync_engine_hook()
        if exported is None:
            os.environ.pop(ENV_ACTIVE, None)
        else:
            os.environ[ENV_ACTIVE] = exported
        raise
    try:
        _sync_engine_hook()
    finally:  # what is active is what engine processes re-apply
        os.environ[ENV_ACTIVE] = ",".join(_state.active)
    return status()


def _apply_selection(wanted: list[str], version, strict: bool) -> None:
    """Make ``wanted`` active; if that raises, the selection before the call is active again."""
    before, skipped_before = dict(_state.active), dict(_state.skipped)
    # A fix whose requirements are not selected leaves with them (and is reported as skipped).
    unmet = {n: [r for r in FIXES[n].requires if r not in wanted] for n in wanted}
    wanted = [n for n in wanted if not unmet[n]]
    leaving = [n for n in _state.active if n not in wanted]
    for name in reversed(leaving):  # last patched, first reverted: overlapping patches unwind
        _state.active.pop(name).revert()
    _state.skipped.clear()
    _state.skipped.update({n: f"needs {', '.join(m)}, which is not selected" for n, m in unmet.items() if m})
    added: list[str] = []
    try:
        for name in wanted:
            if name in _state.active:
                continue
            fix = FIXES[name]
            if not fix.supports(version):
                _state.skipped[name] = f"not needed/available on vLLM {version} (supported: {fix.supported})"
                continue
            missing = [r for r in fix.requires if r not in _state.active]
            if missing:
                _state.skipped[name] = f"needs {', '.join(missing)}, which is not active"
                continue
            patcher = Patcher()
            try:
                if fix.patch is not None:
                    fix.patch(patcher)
            except BaseException as e:
                patcher.revert()  # its own partial patches, whatever stopped it
                if not isinstance(e, Exception):  # KeyboardInterrupt etc.: undo the call, re-raise
                    raise
                if strict:
                    if isinstance(e, InternalsMoved):
                        raise InternalsMoved(f"fix {name}: {e}") from e
                    # Any other error keeps its type (a ValueError for a selection that cannot work stays
                    # one), with the fix's name added to what is printed.
                    if hasattr(e, "add_note"):
                        e.add_note(f"(raised while applying vllm-compat fix {name}; nothing of this apply() stays)")
                    raise
                _state.skipped[name] = f"failed: {e}"
                logger.warning("vllm-compat: fix %s not applied: %s", name, e)
                continue
            _state.active[name] = patcher
            added.append(name)
    except BaseException:
        for name in reversed(added):
            _state.active.pop(name).revert()
        for name in leaving:  # re-made in their order, the same patch objects as before the call
            before[name].redo()
        _state.active.clear()
        _state.active.update(before)
        _state.skipped.clear()
        _state.skipped.update(skipped_before)
        raise


def apply_from_env() -> dict:
    """What ``import vllm_compat`` and the plugin do. A parent's exact selection
    (VLLM_COMPAT_ACTIVE) wins over the user's request (VLLM_COMPAT)."""
    if not _vllm_installed():  # a trainer-only process (vllm_compat.trainer): nothing to patch
        return status()
    if ENV_ACTIVE in os.environ:
        names = [n for n in os.environ[ENV_ACTIVE].split(",") if n]
        return apply(include=names)
    return apply(include=parse_selection(os.environ.get(ENV_REQUEST)))


def _vllm_installed() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


def applied() -> list[str]:
    return list(_state.active)


def mark_plugin_loaded() -> None:
    _state.plugin_loaded = True


def status() -> dict:
    try:
        version = str(versions.vllm_version())
        supported = versions.is_supported()
        verified = versions.is_verified()
    except ImportError:
        version, supported, verified = None, False, False
    return {
        "vllm": version, "supported_range": str(versions.SUPPORTED), "supported": supported,
        "verified": verified, "verified_releases": [str(v) for v in sorted(versions.VERIFIED)],
        "applied": applied(), "skipped": dict(_state.skipped), "pid": os.getpid(),
        "plugin_loaded": _state.plugin_loaded,
        "fixes": {n: {"summary": f.summary, "default": f.default, "supported": f.supported,
                      "active": n in _state.active} for n, f in FIXES.items()},
    }


# ---- engine hook: EngineArgs.create_engine_config -------------------------------------

def _sync_engine_hook() -> None:
    """Every entry point (LLM, AsyncLLM.from_engine_args, `vllm serve`) builds its config
    through EngineArgs.create_engine_config; one wrapper there runs the active fixes'
    configure hooks and installs the worker extension that ``check()`` and ``update_weights``
    talk to, combined with the user's own extension class if there is one."""
    if not _state.active:
        if _state.engine_hook is not None:
            _state.engine_hook.revert()
            _state.engine_hook = None
        return
    if _state.engine_hook is not None:
        return
    from vllm.engine.arg_utils import EngineArgs

    from .fixes.weights.extension import qualname_with

    patcher = Patcher()
    original = getattr(EngineArgs, "create_engine_config")

    def create_engine_config(self, *args, **kwargs):
        self.worker_extension_cls = qualname_with(getattr(self, "worker_extension_cls", None))
        for name in list(_state.active):
            if FIXES[name].configure is not None:
                FIXES[name].configure(self)
        return original(self, *args, **kwargs)

    patcher.replace(EngineArgs, "create_engine_config", create_engine_config, expect_params=["self"])
    _state.engine_hook = patcher
