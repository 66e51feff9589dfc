"""HTTP routes for V0-style in-flight weight updates on vLLM's OpenAI server (``vllm serve``).

The ``weight_updates`` fix installs these in the API server process only (``install`` is
called from the app builder, see ``patch_api_server``). A trainer drives them with JSON:

  POST /vllm_compat/update_weights   {"path": ...} or {"broadcast": group}, "version", "timeout_s"
  POST /vllm_compat/join_broadcast   {"host", "port", "name", "backend", "timeout_s"}
  GET  /vllm_compat/status           vLLM version, fixes per engine process, weight version, paused, fenced

Per-completion weight versions: a request sent with the header ``X-VLLM-Compat-Weight-Versions: 1``
gets, on each choice (non-streaming) or on each choice's final chunk (streaming, the chunk with
a finish_reason), ``"weight_versions": [{"version": v, "start": i}, ...]``: token i is the first
one sampled with weights v. The update route owns the keep-mode pause so that the versions are
recorded before any request takes another step (a response can never miss an update).

The same middleware gives vLLM's own ``/pause?mode=keep`` (dev mode, 0.18+) V0 semantics:
without an explicit ``clear_cache`` it does not clear caches (vLLM's default would preempt
running requests and re-prefill them with the new weights).
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import OrderedDict
from datetime import timedelta
from http import HTTPStatus
from urllib.parse import parse_qsl, urlencode

from fastapi import Request
from fastapi.responses import JSONResponse

from ... import registry, versions
from . import client

logger = logging.getLogger("vllm_compat")

PREFIX = "/vllm_compat"
VERSIONS_HEADER = b"x-vllm-compat-weight-versions"
_TRACKED_ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
_MAX_TRACKED = 1 << 16  # finished choices whose versions nobody asked for are dropped past this


# ---- weight versions per choice ----------------------------------------------------------------

def client_key(state) -> tuple[str, int]:
    """(id the client sees, choice index) of an output-processor request state. The server names
    engine requests ``cmpl-X-<prompt index>`` (completions) or ``chatcmpl-X`` / ``chatcmpl-X_<i>``;
    n > 1 adds a child per sample (``request_index``)."""
    parent = getattr(state, "parent_req", None)
    external = parent.external_req_id if parent is not None else state.external_req_id
    sample = int(getattr(state, "request_index", 0) or 0)
    n = int(getattr(parent, "n", None) or getattr(state, "n", None) or 1)
    if external.startswith("cmpl-"):
        base, _, prompt = external.rpartition("-")
        if prompt.isdigit() and base != "cmpl":
            return base, int(prompt) * n + sample
    return external, sample


def _output_tokens(state) -> int:
    detok = getattr(state, "detokenizer", None)
    return detok.num_output_tokens() if detok is not None else 0


class VersionTracker:
    """Weight version spans of every choice the API server serves: [[version, first token], ...]."""

    def __init__(self) -> None:
        self.version = 0
        self.spans: "OrderedDict[tuple[str, int], list[list[int]]]" = OrderedDict()
        # Updates committed on the engine (WeightUpdateResult.version, what the workers count) -> the
        # version this server reported for it (the route's "version"): the `support` fix's labels.
        self.labels: dict[int, int] = {0: 0}

    def started(self, state) -> None:
        self.spans[client_key(state)] = [[self.version, 0]]
        while len(self.spans) > _MAX_TRACKED:
            self.spans.popitem(last=False)

    def committed(self, engine, in_flight: dict[str, int], version: int) -> dict[str, dict[str, int]]:
        """Record an update committed while the engine is still paused. ``in_flight``: engine
        request id -> tokens sampled before it (from the workers). Returns the same keyed by the
        ids clients see: {id: {choice index: tokens}}."""
        seen: dict[str, dict[str, int]] = {}
        states = getattr(getattr(engine, "output_processor", None), "request_states", None) or {}
        for rid, state in list(states.items()):
            n = in_flight.get(rid)
            if n is None:
                if _output_tokens(state) > 0:
                    continue  # finished in the engine before the update; its last outputs are not read yet
                n = 0  # not scheduled yet: every token comes from the new weights
            key = client_key(state)
            if rid in in_flight:
                seen.setdefault(key[0], {})[str(key[1])] = n
            spans = self.spans.setdefault(key, [[self.version, 0]])
            if spans[-1][1] == n:
                spans[-1][0] = version
            else:
                spans.append([version, n])
        self.version = version
        return seen

    def take(self, client_id: str, index: int) -> list[dict] | None:
        spans = self.spans.pop((client_id, index), None)
        return None if spans is None else [{"version": v, "start": s} for v, s in spans]


TRACKER = VersionTracker()


# ---- the routes --------------------------------------------------------------------------------

class _Server:
    """State of the routes in this API server process (one app per process)."""

    def __init__(self) -> None:
        self.lock: asyncio.Lock | None = None
        self.groups: dict[str, client.BroadcastGroup] = {}

    def get_lock(self) -> asyncio.Lock:
        if self.lock is None:  # created on the server's event loop
            self.lock = asyncio.Lock()
        return self.lock


SERVER = _Server()


class BadRequest(ValueError):
    pass


def _error(status: HTTPStatus, error: str, **extra):
    return JSONResponse({"error": error, "type": extra.pop("type", status.phrase), **extra}, status_code=status.value)


async def _body(request, allowed: set[str]) -> dict:
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError as e:
        raise BadRequest(f"body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(f"unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    return body


def _number(body: dict, key: str, default=None, *, integer=False):
    value = body.get(key, default)
    if value is None:
        return None
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or (not integer and not math.isfinite(value)):
        raise BadRequest(f"{key} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not integer and value <= 0:
        raise BadRequest(f"{key} must be > 0, got {value!r}")
    return value


def _string(body: dict, key: str, default=None) -> str | None:
    value = body.get(key, default)
    if value is not None and (not isinstance(value, str) or not value):
        raise BadRequest(f"{key} must be a non-empty string, got {value!r}")
    return value


async def update_weights_route(request: Request):
    engine = request.app.state.engine_client
    started = time.perf_counter()
    try:
        body = await _body(request, {"path", "broadcast", "version", "timeout_s"})
        path, group_name = _string(body, "path"), _string(body, "broadcast")
        if (path is None) == (group_name is None):
            raise BadRequest('give exactly one of "path" (a safetensors file or directory on the server) '
                             'or "broadcast" (a group joined with /vllm_compat/join_broadcast)')
        version = _number(body, "version", integer=True)
        timeout = _number(body, "timeout_s")
    except BadRequest as e:
        return _error(HTTPStatus.BAD_REQUEST, str(e))
    async with SERVER.get_lock():  # serialised, not rejected: a second trainer call waits its turn
        waited = time.perf_counter() - started
        if group_name is not None:
            weights = SERVER.groups.get(group_name)
            if weights is None:
                return _error(HTTPStatus.CONFLICT, f"no broadcast group {group_name!r}: POST {PREFIX}/join_broadcast "
                              f"first (joined: {sorted(SERVER.groups)})", changed=False)
        else:
            weights = path
        # This route pauses (update_weights leaves a caller's pause alone) so that the new version is
        # recorded before any request takes a step with the new weights.
        paused_here = False
        try:
            if versions.has_keep_mode_pause(engine) and not await engine.is_paused():
                paused_here = True  # set before awaiting: whatever happens, the finally resumes
                await engine.pause_generation(mode="keep", clear_cache=False)
            result = await client.update_weights(engine, weights, timeout=timeout)
            new_version = TRACKER.version + 1 if version is None else version
            in_flight = TRACKER.committed(engine, result.in_flight, new_version)
            TRACKER.labels[result.version] = new_version
        except client.WeightUpdateTimeout as e:
            return _error(HTTPStatus.REQUEST_TIMEOUT, str(e), type="WeightUpdateTimeout", changed=False)
        except client.WeightUpdateError as e:
            return _error(HTTPStatus.UNPROCESSABLE_ENTITY, str(e), type="WeightUpdateError", changed=False,
                          reasons=_reasons(e))
        except client.WeightUpdateIncomplete as e:
            return _error(HTTPStatus.INTERNAL_SERVER_ERROR, str(e), type="WeightUpdateIncomplete", changed=True,
                          fenced=True)
        except Exception as e:
            logger.exception("vllm-compat: weight update failed")
            return _error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(e).__name__}: {e}", type=type(e).__name__,
                          fenced=client.fence_of(engine) is not None)
        finally:
            if paused_here:
                try:
                    await engine.resume_generation()
                except Exception as e:  # the update's own outcome stands; status shows paused
                    logger.error("vllm-compat: resuming after a weight update failed: %s", e)
    return JSONResponse({
        "version": new_version, "tensors": result.tensors, "bytes": result.bytes, "in_flight": in_flight,
        "seconds": {**result.seconds, "waited_for_lock": waited, "route": time.perf_counter() - started},
        "updates_committed": result.version,
    })


def _reasons(error: BaseException) -> list[str]:
    lines = str(error).splitlines()
    return [line.strip() for line in lines[1:]] or [str(error)]


async def join_broadcast_route(request: Request):
    engine = request.app.state.engine_client
    try:
        body = await _body(request, {"host", "port", "name", "backend", "timeout_s"})
        host, name = _string(body, "host"), _string(body, "name", "default")
        port = _number(body, "port", integer=True)
        backend = _string(body, "backend")
        timeout = _number(body, "timeout_s", client.tp.DEFAULT_TIMEOUT.total_seconds())
        if host is None or port is None:
            raise BadRequest('"host" and "port" (the trainer\'s WeightBroadcaster) are required')
    except BadRequest as e:
        return _error(HTTPStatus.BAD_REQUEST, str(e))
    async with SERVER.get_lock():
        started = time.perf_counter()
        try:
            group = await client.join_weight_broadcast(engine, host, port, backend=backend, name=name,
                                                       timeout=timedelta(seconds=timeout))
        except Exception as e:  # the trainer never connected, wrong address, backend missing
            SERVER.groups.pop(name, None)  # a half-joined group is no group
            return _error(HTTPStatus.BAD_GATEWAY, f"joining broadcast group {name!r} at {host}:{port} failed: "
                          f"{type(e).__name__}: {e}", type="JoinFailed")
        SERVER.groups[name] = group
    return JSONResponse({"name": group.name, "world_size": group.world_size,
                         "seconds": time.perf_counter() - started})


async def status_route(request: Request):
    engine = request.app.state.engine_client
    import vllm_compat

    own = registry.status()
    try:
        reports = await engine.collective_rpc("vllm_compat_status")
        error = None
    except Exception as e:
        reports, error = [], f"{type(e).__name__}: {e}"
    try:
        vllm_compat._compare(own["applied"], reports)
        consistent = error is None
    except vllm_compat.CompatCheckError as e:
        consistent, error = False, str(e)
    paused = await engine.is_paused() if hasattr(engine, "is_paused") else None
    fence = client.fence_of(engine)
    return JSONResponse({
        "vllm": own["vllm"], "vllm_compat": vllm_compat.__version__, "applied": own["applied"],
        "engine_processes": [{k: r.get(k) for k in ("pid", "applied", "skipped", "plugin_loaded", "model_runner",
                                                    "staged_update")} for r in reports],
        "consistent": consistent, "error": error,
        "weight_version": TRACKER.version, "paused": paused, "fenced": fence.message() if fence else None,
        "broadcast_groups": sorted(SERVER.groups),
    })


# ---- middleware: weight versions into responses, V0 default for /pause?mode=keep -----------------

def _asked(scope) -> bool:
    for name, value in scope.get("headers") or ():
        if name == VERSIONS_HEADER:
            return value.strip().lower() not in (b"", b"0", b"false", b"no")
    return False


def _tag(doc: dict) -> bool:
    """Adds weight_versions to each finished choice of a completion (chunk); whether it changed."""
    changed = False
    client_id = doc.get("id")
    for choice in doc.get("choices") or ():
        if isinstance(choice, dict) and choice.get("finish_reason") is not None and isinstance(client_id, str):
            choice["weight_versions"] = TRACKER.take(client_id, int(choice.get("index", 0)))
            changed = True
    return changed


def _keep_pause_default(scope) -> None:
    """vLLM's /pause defaults to clear_cache=true, which in keep mode preempts running requests and
    re-prefills them after the update (not V0). Without an explicit clear_cache, keep it."""
    query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    if ("mode", "keep") in query and not any(k == "clear_cache" for k, _ in query):
        scope["query_string"] = urlencode(query + [("clear_cache", "false")]).encode("latin-1")


class CompatMiddleware:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if scope.get("method") == "POST" and path.rstrip("/") == "/pause":
            _keep_pause_default(scope)
        if not (scope.get("method") == "POST" and path.rstrip("/") in _TRACKED_ENDPOINTS and _asked(scope)):
            return await self.app(scope, receive, send)
        await self.app(scope, receive, _Tagger(send).send)


class _Tagger:
    """Rewrites a completions response on its way out: JSON bodies whole, event streams per event."""

    def __init__(self, send) -> None:
        self._send = send
        self._start: dict | None = None
        self._stream = False
        self._buffer = b""

    async def send(self, message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            headers = dict((k.lower(), v) for k, v in message.get("headers") or ())
            self._stream = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            if self._stream:
                return await self._send(message)
            self._start = message  # held until the whole body is in (its length changes)
            return
        if kind != "http.response.body":
            return await self._send(message)
        more = message.get("more_body", False)
        self._buffer += message.get("body", b"")
        if self._stream:
            events, _, self._buffer = self._buffer.rpartition(b"\n\n") if more else (self._buffer, b"", b"")
            body = self._events(events + b"\n\n" if more and events else events)
            if body or not more:
                await self._send({"type": "http.response.body", "body": body, "more_body": more})
            return
        if more:
            return
        body = self._json(self._buffer)
        start = dict(self._start or {"type": "http.response.start", "status": 200})
        start["headers"] = [(k, str(len(body)).encode() if k.lower() == b"content-length" else v)
                            for k, v in start.get("headers") or ()]
        await self._send(start)
        await self._send({"type": "http.response.body", "body": body, "more_body": False})

    @staticmethod
    def _json(body: bytes) -> bytes:
        try:
            doc = json.loads(body)
        except ValueError:
            return body
        return json.dumps(doc).encode() if isinstance(doc, dict) and _tag(doc) else body

    @staticmethod
    def _events(data: bytes) -> bytes:
        if b'"finish_reason":"' not in data and b'"finish_reason": "' not in data:
            return data  # fast path: no choice finishes in these events
        out = []
        for event in data.split(b"\n\n"):
            if event.startswith(b"data: ") and b'"finish_reason"' in event:
                try:
                    doc = json.loads(event[6:])
                    if isinstance(doc, dict) and _tag(doc):
                        event = b"data: " + json.dumps(doc).encode()
                except ValueError:
                    pass
            out.append(event)
        return b"\n\n".join(out)


def install(app) -> None:
    """Adds the routes and the middleware to vLLM's FastAPI app (while it is being built)."""
    from fastapi import APIRouter

    router = APIRouter()
    router.add_api_route(f"{PREFIX}/update_weights", update_weights_route, methods=["POST"])
    router.add_api_route(f"{PREFIX}/join_broadcast", join_broadcast_route, methods=["POST"])
    router.add_api_route(f"{PREFIX}/status", status_route, methods=["GET"])
    app.include_router(router)
    app.add_middleware(CompatMiddleware)
    logger.info("vllm-compat: routes %s/{update_weights,join_broadcast,status} installed", PREFIX)
