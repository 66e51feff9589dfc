"""Golden V0 fixtures: schema, validated loading, and the comparison metrics.

A fixture file holds, for one model and one reference engine (``v0`` = stock vLLM 0.8.5
V0, ``v0_fp32_head`` = the same with the lm_head computed in fp32), every scenario's
request specs, V0's outputs and the trainer-side reference on V0's sequences.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .runner import decode_lp

SCHEMA = "vllm-compat-golden/1"
REFERENCES = ("v0", "v0_fp32_head")
PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the vllm_compat package
GOLDEN_DIR = PACKAGE_ROOT.parent / "tests" / "golden"


class GoldenFixtureError(ValueError):
    """A fixture file is unreadable, corrupt, of another schema, or does not match its model."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_hashes(model_dir: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(model_dir.iterdir()) if p.is_file()}


@dataclass
class Fixture:
    path: Path
    data: dict

    @property
    def model(self) -> str:
        return self.data["model"]["name"]

    @property
    def reference(self) -> str:
        return self.data["reference"]

    @property
    def scenarios(self) -> list[dict]:
        return self.data["scenarios"]

    def model_dir(self, models_root: Path) -> Path:
        return models_root / self.model


def _require(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise GoldenFixtureError(f"{path}: {what}")


def _check_positions(positions: Any, path: Path, where: str) -> None:
    _require(isinstance(positions, list), path, f"{where}: expected a list of positions")
    for pos in positions:
        if pos is None:
            continue
        _require(isinstance(pos, list), path, f"{where}: a position is not a list")
        for entry in pos:
            _require(isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], int),
                     path, f"{where}: bad entry {entry!r} (want [token, logprob, rank])")
            try:
                decode_lp(entry[1])
            except ValueError as e:
                raise GoldenFixtureError(f"{path}: {where}: {e}") from None


def validate(data: Any, path: Path, models_root: Path | None = None) -> None:
    _require(isinstance(data, dict), path, "top level is not an object")
    schema = data.get("schema")
    _require(schema == SCHEMA, path, f"schema {schema!r} is not {SCHEMA!r} (regenerate with ci/v0/generate.sh)")
    for key in ("reference", "model", "generator", "scenarios"):
        _require(key in data, path, f"missing key {key!r}")
    _require(data["reference"] in REFERENCES, path, f"unknown reference {data['reference']!r}")
    model = data["model"]
    _require(isinstance(model, dict) and isinstance(model.get("name"), str) and isinstance(model.get("files"), dict),
             path, "model must have a name and file hashes")
    for sc in data["scenarios"]:
        name = sc.get("name", "?")
        for key in ("name", "requests", "results"):
            _require(key in sc, path, f"scenario {name}: missing key {key!r}")
        expected = len(sc["requests"]) + (len(sc["update"]["late_requests"]) if sc.get("update") else 0)
        _require(len(sc["results"]) == expected, path, f"scenario {name}: {len(sc['results'])} results for {expected} requests")
        for i, res in enumerate(sc["results"]):
            if res["prompt_logprobs"] is not None:
                _check_positions(res["prompt_logprobs"], path, f"scenario {name} request {i} prompt_logprobs")
            for c in res["completions"]:
                _require(isinstance(c.get("token_ids"), list), path, f"scenario {name}: completion without token_ids")
                if c.get("logprobs") is not None:
                    _check_positions(c["logprobs"], path, f"scenario {name} request {i} logprobs")
                    _require(len(c["logprobs"]) == len(c["token_ids"]), path,
                             f"scenario {name} request {i}: {len(c['logprobs'])} logprob positions for "
                             f"{len(c['token_ids'])} tokens")
    if models_root is not None:
        mdir = models_root / model["name"]
        for fname, digest in model["files"].items():
            f = mdir / fname
            _require(f.is_file(), path, f"model file {f} is missing")
            _require(sha256(f) == digest, path, f"model file {f} does not match the hash the fixture was made with")


def load_fixture(path: str | Path, models_root: str | Path | None = GOLDEN_DIR / "models") -> Fixture:
    """Load and validate one fixture; raises GoldenFixtureError with the reason."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise GoldenFixtureError(f"{path}: no such fixture file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GoldenFixtureError(f"{path}: not valid JSON ({e})") from None
    try:
        validate(data, path, None if models_root is None else Path(models_root))
    except (KeyError, TypeError, AttributeError) as e:
        raise GoldenFixtureError(f"{path}: malformed ({type(e).__name__}: {e})") from None
    return Fixture(path, data)


def load_all(fixtures_dir: str | Path = GOLDEN_DIR / "fixtures",
             models_root: str | Path = GOLDEN_DIR / "models") -> list[Fixture]:
    files = sorted(Path(fixtures_dir).glob("*.json"))
    if not files:
        raise GoldenFixtureError(f"{fixtures_dir}: no fixture files")
    return [load_fixture(f, models_root) for f in files]


# --------------------------------------------------------------------------- metrics

def as_dict(position: list | None) -> dict[int, tuple[float, int | None]]:
    return {} if position is None else {e[0]: (decode_lp(e[1]), e[2]) for e in position}


def abs_diff(a: float, b: float) -> float:
    """|a - b| with -inf == -inf counted as 0 and -inf vs finite as inf."""
    if a == b:
        return 0.0
    return abs(a - b)


def k3(lp_ref: float, lp_engine: float) -> float:
    """k3 estimator term for tokens sampled by the engine: (r - 1) - log r, r = p_ref / p_engine."""
    if lp_ref == lp_engine:
        return 0.0
    if lp_ref == -math.inf:
        return math.inf
    if lp_engine == -math.inf:
        return math.inf
    log_r = lp_ref - lp_engine
    return math.expm1(log_r) - log_r


def knife_edge_gap(mine: dict, ref: dict, min_p: float = 0.0) -> float | None:
    """How close a position whose kept sets differ sits to its masking boundary, in scaled-logit
    units (logprob differences on one side are exact differences of logits / T); None when the
    kept sets (finite entries of the tokens both lists hold) agree or no gap can be measured.

    For each token finite on one side only (side A): the distance, on side A, to the nearest
    token both sides keep (top-k: |x_k - x_{k+1}| / T; also exact ties), and with ``min_p`` the
    distance of its logprob from the min-p cut ``lp(top) + log(min_p)``; the position's gap is
    the largest of these over its flipped tokens (every flip must be on the edge). A top-p
    boundary is a cumulative-probability margin that the lists cannot give: a top-p flip is
    excused only when its logit gap is also below the floor.
    """
    common = mine.keys() & ref.keys()
    flipped = [t for t in common if (mine[t][0] == -math.inf) != (ref[t][0] == -math.inf)]
    if not flipped:
        return None
    kept_both = [u for u in common if mine[u][0] != -math.inf and ref[u][0] != -math.inf]
    if not kept_both:
        return math.inf
    worst = 0.0
    for t in flipped:
        side = mine if mine[t][0] != -math.inf else ref
        gap = min(abs(side[u][0] - side[t][0]) for u in kept_both)
        if min_p > 0.0:
            top = max(v for v, _ in side.values())
            gap = min(gap, abs(side[t][0] - (top + math.log(min_p))))
        worst = max(worst, gap)
    return worst


@dataclass
class Tally:
    """Running maxima and agreement counts for one scenario."""

    sampled_max: float = 0.0
    topk_max: float = 0.0
    prompt_max: float = 0.0
    mask_agree: int = 0
    mask_total: int = 0
    rank_agree: int = 0
    rank_total: int = 0
    token_agree: int = 0
    token_total: int = 0
    compared_positions: int = 0
    expected_positions: int = 0
    # Requests whose reference has prompt logprobs while the engine returned none, and
    # completions whose reference has sampled logprobs while the engine returned none.
    prompt_missing: int = 0
    logprobs_missing: int = 0
    k3_sum: float = 0.0
    k3_n: int = 0
    # Knife edges (knife_edge_gap below edge_floor): counted and listed as
    # (request, "prompt" or completion index, position, gap), left out of every other metric.
    edge_floor: float | None = None
    edges: list | None = None
    # When a list: every compared entry as (kind, engine logprob, reference logprob), kind one
    # of "sampled", "topk", "prompt" (what `verify --plot` draws; the maxima above come from it).
    pairs: list | None = None

    def is_edge(self, mine: dict, ref: dict, where: tuple, min_p: float = 0.0) -> bool:
        if self.edge_floor is None:
            return False
        gap = knife_edge_gap(mine, ref, min_p)
        if gap is None or not gap < self.edge_floor:
            return False
        if self.edges is None:
            self.edges = []
        self.edges.append((*where, gap))
        return True

    def position(self, mine: dict, ref: dict, sampled_token: int | None, kind: str | None, where: tuple,
                 min_p: float = 0.0, suspect: float | None = None, boundary=None) -> None:
        """One position, unless it is a knife edge: by the lists (knife_edge_gap), or, where its
        kept sets differ or its largest |Δ| exceeds ``suspect``, by ``boundary(where)`` (the
        reference's distance to its masking boundary, from the full distribution)."""
        if self.is_edge(mine, ref, where, min_p):
            return
        sub = Tally(pairs=[] if self.pairs is not None else None)
        sub.positions(mine, ref, sampled_token, kind)
        worst = max(sub.sampled_max, sub.topk_max)
        if boundary is not None and self.edge_floor is not None and (
                sub.mask_agree < sub.mask_total or (suspect is not None and worst > suspect)):
            gap = boundary(where)
            if gap is not None and gap < self.edge_floor:
                self.edges = (self.edges or []) + [(*where, gap)]
                return
        if kind == "prompt":
            self.prompt_max = max(self.prompt_max, sub.topk_max)
        else:
            self.sampled_max, self.topk_max = max(self.sampled_max, sub.sampled_max), max(self.topk_max, sub.topk_max)
            self.k3_sum, self.k3_n = self.k3_sum + sub.k3_sum, self.k3_n + sub.k3_n
        self.mask_agree, self.mask_total = self.mask_agree + sub.mask_agree, self.mask_total + sub.mask_total
        self.rank_agree, self.rank_total = self.rank_agree + sub.rank_agree, self.rank_total + sub.rank_total
        if self.pairs is not None:
            self.pairs.extend(sub.pairs)

    def positions(self, mine: dict, ref: dict, sampled_token: int | None, kind: str | None = None) -> None:
        """Compare one position's logprob dicts (same context on both sides)."""
        for tok in mine.keys() & ref.keys():
            (a, ra), (b, rb) = mine[tok], ref[tok]
            self.mask_total += 1
            self.mask_agree += (a == -math.inf) == (b == -math.inf)
            d = abs_diff(a, b)
            if self.pairs is not None:
                self.pairs.append((kind or ("sampled" if tok == sampled_token else "topk"), a, b))
            if tok == sampled_token:
                self.sampled_max = max(self.sampled_max, d)
                self.k3_sum += k3(b, a)
                self.k3_n += 1
            else:
                self.topk_max = max(self.topk_max, d)
            if a != -math.inf and b != -math.inf and ra is not None and rb is not None:
                self.rank_total += 1
                self.rank_agree += ra == rb

    def summary(self) -> dict:
        ratio = lambda a, n: None if n == 0 else a / n  # noqa: E731
        return {"sampled_max_abs": self.sampled_max, "topk_max_abs": self.topk_max,
                "prompt_max_abs": self.prompt_max,
                "mask_agreement": ratio(self.mask_agree, self.mask_total),
                "rank_agreement": ratio(self.rank_agree, self.rank_total),
                "token_agreement": ratio(self.token_agree, self.token_total),
                "compared_positions": self.compared_positions,
                "expected_positions": self.expected_positions,
                "prompt_missing": self.prompt_missing,
                "logprobs_missing": self.logprobs_missing,
                "edges": None if self.edge_floor is None else len(self.edges or []),
                "edge_positions": [list(e) for e in self.edges or []],
                "k3": None if self.k3_n == 0 else self.k3_sum / self.k3_n}


def compare_to_reference(results: list[dict], reference: list[dict], pairs: list | None = None,
                         edge_floor: float | None = None, params: list[dict] | None = None,
                         suspect: float | None = None, boundary=None) -> dict:
    """Engine results vs a reference engine's results, request by request.

    Sampled positions are compared while both sides share the context: up to and
    including the first position where the sampled tokens differ (the distribution there
    is still comparable; the sampled-token logprob only where both sampled the same token).
    ``pairs``: a list that receives every compared entry (``Tally.pairs``).
    ``edge_floor``: positions whose kept sets differ within this gap (knife_edge_gap) are
    counted as knife edges and left out of the maxima, masks and ranks; None: no exclusion.
    ``params``: each request's sampling params (for the min-p cut), if known.
    ``boundary(where)``, with ``suspect``: the reference's margin to its masking boundary at
    ``where`` = (request, "prompt" or completion index, position), asked where the lists
    cannot tell (a flip outside the returned top-k shifts every logprob of the position).
    ``compared_positions`` counts sampled positions with logprobs on both sides;
    ``expected_positions`` is the reference's number of sampled tokens that have logprobs (all
    of them compared when the tokens agree).
    """
    t = Tally(pairs=pairs, edge_floor=edge_floor)
    for i_req, (mine, ref) in enumerate(zip(results, reference, strict=True)):
        min_p = float(((params or [])[i_req:i_req + 1] or [{}])[0].get("min_p", 0.0) or 0.0)
        # Compared where both sides have them: V0 0.8.5 returns none for n > 1 requests.
        if ref["prompt_logprobs"] is not None and mine["prompt_logprobs"] is None:
            t.prompt_missing += 1
        both = mine["prompt_logprobs"] is not None and ref["prompt_logprobs"] is not None
        for i_pos, (pm, pr) in enumerate(zip(mine["prompt_logprobs"] if both else [],
                                             ref["prompt_logprobs"] if both else [])):
            t.position(as_dict(pm), as_dict(pr), None, "prompt", (i_req, "prompt", i_pos), min_p, suspect, boundary)
        for i_c, (cm, cr) in enumerate(zip(mine["completions"], ref["completions"], strict=True)):
            toks_m, toks_r = cm["token_ids"], cr["token_ids"]
            t.token_total += len(toks_r)
            lps_m, lps_r = cm.get("logprobs"), cr.get("logprobs")
            if lps_r is not None:
                t.expected_positions += len(toks_r)
                t.logprobs_missing += lps_m is None
            for i, (a, b) in enumerate(zip(toks_m, toks_r)):
                if lps_m is not None and i < len(lps_m) and lps_r is not None:
                    t.compared_positions += 1
                    t.position(as_dict(lps_m[i]), as_dict(lps_r[i]), a if a == b else None, None, (i_req, i_c, i),
                               min_p, suspect, boundary)
                if a != b:
                    break
                t.token_agree += 1
    return t.summary()


def logit_ties(results: list[dict]) -> dict:
    """The bf16-head signature, read from an engine's own lists (no reference needed): positions
    (sampled and prompt) where two finite entries of the returned list have exactly the same
    logprob. A bf16 lm_head puts every logit on the bf16 grid (spacing 2^-5 to 2^-4 at the
    logit sizes of the tiny models), so the top entries tie often; with an fp32 head an exact
    tie of two logits is rare (V0's fp32-head fixtures: none). Temperature and V0's
    processing keep ties and add none.
    -> {"positions": positions with >= 2 finite entries, "tied": those with a tie,
        "fraction": tied / positions (None without positions)}."""
    n = tied = 0
    for res in results:
        lists = list(res["prompt_logprobs"] or ()) + [e for c in res["completions"] for e in c.get("logprobs") or ()]
        for entries in lists:
            finite = [decode_lp(e[1]) for e in entries or () if decode_lp(e[1]) != -math.inf]
            if len(finite) >= 2:
                n += 1
                tied += len(set(finite)) < len(finite)
    return {"positions": n, "tied": tied, "fraction": tied / n if n else None}


def compare_to_trainer(results: list[dict], trainer: list[dict | None], key: str) -> dict:
    """Engine sampled-token logprobs vs the trainer's on the engine's own sequences."""
    dmax, k3_sum, n, pmax = 0.0, 0.0, 0, 0.0
    for res, tr in zip(results, trainer, strict=True):
        if tr is None:
            continue
        if res["prompt_logprobs"] is not None:
            for pos, (tok, ref) in enumerate(zip(tr["prompt_tokens"], tr["prompt"][key])):
                if ref is None:
                    continue
                mine = as_dict(res["prompt_logprobs"][pos])[tok][0]
                pmax = max(pmax, abs_diff(mine, ref))
        for c, ct in zip(res["completions"], tr["completions"], strict=True):
            for tok, pos, ref in zip(c["token_ids"], c["logprobs"], ct[key]):
                mine = as_dict(pos)[tok][0]
                dmax = max(dmax, abs_diff(mine, ref))
                k3_sum += k3(ref, mine)
                n += 1
    return {"sampled_max_abs": dmax, "prompt_max_abs": pmax, "k3": k3_sum / n if n else None}


def trainer_scores(trainer, scenario: dict, results: list[dict]) -> list[dict | None]:
    """Score an engine's own sequences with a TrainerReference (None for update scenarios,
    whose later tokens came from two weight sets and old KV: no single trainer pass matches)."""
    if scenario.get("update"):
        return [None] * len(results)
    from ..trainer import SampledSupport

    out = []
    for req, res in zip(scenario["requests"], results, strict=True):
        prompt = req["prompt_token_ids"]
        comps = [trainer.score(prompt, c["token_ids"], req["params"],
                               SampledSupport.from_json(c["support"]) if c.get("support") else None)
                 for c in res["completions"]]
        out.append({"prompt_tokens": prompt, "prompt": comps[0]["prompt"],
                    "completions": [c["completion"] for c in comps]})
    return out


def encode_trainer(scores: Iterable[dict | None]) -> list[dict | None]:
    from .runner import encode_lp

    def enc(v):
        return None if v is None else encode_lp(v)

    out = []
    for s in scores:
        if s is None:
            out.append(None)
            continue
        out.append({"prompt_tokens": s["prompt_tokens"],
                    "prompt": {k: [enc(v) for v in vs] for k, vs in s["prompt"].items()},
                    "completions": [{k: [enc(v) for v in vs] for k, vs in c.items()} for c in s["completions"]]})
    return out


def decode_trainer(stored: list[dict | None]) -> list[dict | None]:
    def dec(v):
        return None if v is None else decode_lp(v)

    return [None if s is None else
            {"prompt_tokens": s["prompt_tokens"],
             "prompt": {k: [dec(v) for v in vs] for k, vs in s["prompt"].items()},
             "completions": [{k: [dec(v) for v in vs] for k, vs in c.items()} for c in s["completions"]]}
            for s in stored]
