"""Reference distributions: the versioned file format, prompt prefixes cut at token boundaries, record and compute.

A reference holds, for fixed prompt prefixes, the next-token top-K (ids when known, decoded strings, logprobs) of
a reference model -- computed from a full-precision checkpoint (`compute`, exllamav3) or recorded from an earlier
deployment (`record`, over HTTP) -- plus what makes a comparison valid: tokenizer identity, settings, model id.

Teacher-forced positions: for each prompt the prefix is the prompt's text cut at a character offset, chosen so
that the prefix's tokens are exactly the first n tokens of the whole prompt (checked by encoding both). The
tokenization round trip is the caveat: decode(encode(text)[:n]) re-encoded need not give the same n tokens when a
merge spans the cut, so cuts are taken only where a new word starts (before a space or newline, after CJK punctuation or a comma)
and each is verified; a candidate that fails the check is skipped. The server therefore sees a plain string
prompt whose tokens are the reference's context tokens, and verification needs no decode endpoint.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .. import inputs
from ..atomic import write_bytes, write_text
from ..errors import BadInput, VerificationFailed
from ..redact import redact_data
from .kl import distribution_problem

if TYPE_CHECKING:
    from .client import TabbyClient

FORMAT = "glm-deploy-reference"
VERSION = 1
KIND_FULL_PRECISION = "full_precision"
KIND_QUANTIZED = "quantized"
KIND_DEPLOYMENT = "deployment"
KINDS = (KIND_FULL_PRECISION, KIND_QUANTIZED, KIND_DEPLOYMENT)
# settings["source"] of a reference computed in-process from a model folder (recorded ones hold the server's URL).
SOURCE_COMPUTE = "compute"

DEFAULT_PROMPTS = Path(__file__).resolve().parent / "prompts" / "default.yaml"
POSITIONS_PER_PROMPT = 4
# Leave this share of each prompt as context before the first measured position.
MIN_CONTEXT_SHARE = 0.25
RECORD_TOP_K = 100
COMPUTE_TOP_K = 200
MAX_TOP_K = 1000  # --top-k above this only makes references huge: the spot-check reads K = 100
# Encoded through /v1/token/encode (or the local tokenizer) and hashed: equal hashes mean the same tokenizer.
TOKENIZER_PROBE = (
    "Tokenizer probe: The quick brown fox jumps over the lazy dog. 0123456789 "
    "def f(x):\n    return x ** 2  # ünïcödé 漢字かな 한국어 Привет مرحبا\n\n"
)
WORD_STARTS_AFTER = "，。、；：！？)]},"


@dataclass(frozen=True)
class Prompt:
    """One prompt text of a prompt set."""

    name: str
    text: str


@dataclass(frozen=True)
class Position:
    """One teacher-forced position: the prefix sent, its token ids (when known) and the reference's top-K."""

    prefix: str
    token_count: int
    prefix_ids: tuple[int, ...] | None
    top_ids: tuple[int, ...] | None
    top_tokens: tuple[str, ...]
    top_logprobs: tuple[float, ...]

    def entries(self) -> list[tuple[str, float]]:
        """(decoded string, logprob) pairs, duplicates kept (the estimator merges them)."""
        return list(zip(self.top_tokens, self.top_logprobs))


@dataclass(frozen=True)
class ReferencePrompt:
    """A prompt of the reference with its measured positions."""

    name: str
    text: str
    positions: tuple[Position, ...]


@dataclass(frozen=True)
class Reference:
    """A loaded reference file."""

    kind: str
    model_id: str
    created: str
    settings: dict[str, Any]
    tokenizer: dict[str, Any]
    vocab_collisions: dict[str, int] | None
    prompts: tuple[ReferencePrompt, ...]

    @property
    def positions(self) -> int:
        """How many positions the reference holds."""
        return sum(len(p.positions) for p in self.prompts)

    def as_dict(self) -> dict[str, Any]:
        """The JSON document (format + version first)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "kind": self.kind,
            "model_id": self.model_id,
            "created": self.created,
            "settings": self.settings,
            "tokenizer": self.tokenizer,
            "vocab_collisions": self.vocab_collisions,
            "prompts": [
                {
                    "name": p.name,
                    "text": p.text,
                    "positions": [
                        {
                            "prefix": s.prefix,
                            "token_count": s.token_count,
                            "prefix_ids": list(s.prefix_ids) if s.prefix_ids is not None else None,
                            "top": {
                                "ids": list(s.top_ids) if s.top_ids is not None else None,
                                "tokens": list(s.top_tokens),
                                "logprobs": list(s.top_logprobs),
                            },
                        }
                        for s in p.positions
                    ],
                }
                for p in self.prompts
            ],
        }


def load_prompts(path: Path | None = None) -> list[Prompt]:
    """A prompt set (YAML or JSON: {version: 1, prompts: [{name, text}]}); the shipped default when None."""
    source = path or DEFAULT_PROMPTS
    what = "--prompts"
    data = inputs.parse_yaml(
        inputs.read_text(source, what, hint="pass a readable --prompts file"), what, source
    )
    items = data.get("prompts") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items:
        raise BadInput(
            f"prompt set {source} has no prompts", "expected {version: 1, prompts: [{name, text}]}"
        )
    prompts = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("text"), str) or not item["text"].strip():
            raise BadInput(f"prompt set {source}: prompts[{i}] needs a non-empty text", "fix the file")
        prompts.append(Prompt(name=str(item.get("name") or f"prompt-{i}"), text=item["text"]))
    return prompts


def prompts_sha256(prompts: Sequence[Prompt]) -> str:
    """sha256 of a prompt set's names and texts: a reference is reused only for the same prompts."""
    return hashlib.sha256(
        json.dumps([[p.name, p.text] for p in prompts], ensure_ascii=False).encode()
    ).hexdigest()


def probe_identity(ids: Sequence[int]) -> str:
    """sha256 of the probe's token ids: the tokenizer identity both sides can compute."""
    return hashlib.sha256(json.dumps(list(ids)).encode()).hexdigest()


def _cut_candidates(text: str) -> list[int]:
    """Character offsets where a new word starts: before a space or newline, or after CJK/closing punctuation."""
    return [
        c
        for c in range(1, len(text))
        if not text[c - 1].isspace() and (text[c] in " \n" or text[c - 1] in WORD_STARTS_AFTER)
    ]


def choose_prefixes(
    text: str, encode: Callable[[str], list[int]], count: int = POSITIONS_PER_PROMPT
) -> list[tuple[str, list[int]]]:
    """Up to `count` (prefix, prefix ids) spread over text, each a verified token-boundary cut."""
    full = encode(text)
    candidates = [c for c in _cut_candidates(text) if c >= len(text) * MIN_CONTEXT_SHARE]
    chosen: list[tuple[str, list[int]]] = []
    if not candidates:
        return chosen
    step = len(candidates) / count
    targets = [int(step * (j + 0.5)) for j in range(count)]
    used: set[int] = set()
    for target in targets:
        for candidate in candidates[target:] + candidates[:target][::-1]:
            if candidate in used:
                continue
            ids = encode(text[:candidate])
            if ids and len(ids) < len(full) and full[: len(ids)] == ids:
                used.add(candidate)
                chosen.append((text[:candidate], ids))
                break
            used.add(candidate)
    return sorted(chosen, key=lambda item: len(item[0]))


def save_reference(reference: Reference, path: Path) -> None:
    """Write JSON (gzip when the name ends in .gz) atomically, every secret the run read redacted."""
    for prompt in reference.prompts:
        for number, position in enumerate(prompt.positions, 1):
            problem = distribution_problem(position.entries())
            if problem is not None:
                raise VerificationFailed(
                    f"not writing {path}: prompt {prompt.name!r} position {number} is not log-probabilities: "
                    f"{problem}",
                    "the server does not report a real distribution; check what it serves",
                )
    text = json.dumps(redact_data(reference.as_dict()), ensure_ascii=False, allow_nan=False)
    if path.suffix == ".gz":
        write_bytes(path, gzip.compress(text.encode("utf-8"), mtime=0))
    else:
        write_text(path, text + "\n")


def _bad(path: Path, problem: str) -> BadInput:
    return BadInput(f"reference {path}: {problem}", "record it again with `deploy reference record|compute`")


def _position(path: Path, raw: Any, where: str) -> Position:
    if (
        not isinstance(raw, dict)
        or not isinstance(raw.get("prefix"), str)
        or not isinstance(raw.get("top"), dict)
    ):
        raise _bad(path, f"{where} needs prefix and top")
    top = raw["top"]
    tokens, logprobs, ids = top.get("tokens"), top.get("logprobs"), top.get("ids")
    if (
        not isinstance(tokens, list)
        or not isinstance(logprobs, list)
        or len(tokens) != len(logprobs)
        or not tokens
    ):
        raise _bad(path, f"{where}.top needs tokens and logprobs of equal, non-zero length")
    if ids is not None and (not isinstance(ids, list) or len(ids) != len(tokens)):
        raise _bad(path, f"{where}.top.ids must match tokens")
    prefix_ids = raw.get("prefix_ids")
    token_count = raw.get("token_count") or 0
    if not _whole(token_count) or token_count < 0:
        raise _bad(path, f"{where}.token_count {token_count!r} is not a whole number")
    for name, values in (("prefix_ids", prefix_ids), ("top.ids", ids)):
        if values is not None and (not isinstance(values, list) or not all(_whole(i) for i in values)):
            raise _bad(path, f"{where}.{name} must be a list of token ids")
    if not all(isinstance(t, str) for t in tokens):
        raise _bad(path, f"{where}.top.tokens must be strings")
    problem = distribution_problem(zip(tokens, logprobs))
    if problem is not None:
        raise _bad(path, f"{where}: not log-probabilities: {problem}")
    return Position(
        prefix=raw["prefix"],
        token_count=token_count,
        prefix_ids=tuple(prefix_ids) if prefix_ids is not None else None,
        top_ids=tuple(ids) if ids is not None else None,
        top_tokens=tuple(tokens),
        top_logprobs=tuple(float(v) for v in logprobs),
    )


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**40


def load_reference(path: Path) -> Reference:
    """Read and validate a reference file; any problem is one BadInput line (exit 2)."""
    what = "--reference"
    raw = inputs.read_bytes(path, what, inputs.REFERENCE_BYTES, "pass an existing --reference file")
    if raw[:2] == b"\x1f\x8b":
        raw = inputs.inflate(raw, what, path, inputs.REFERENCE_BYTES)
    data = inputs.parse_json(inputs.decode(raw, what, path), what, path, "record it again", constants=True)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise _bad(path, f"is not a {FORMAT} file")
    if data.get("version") != VERSION:
        raise _bad(path, f"has version {data.get('version')!r}; this toolkit reads version {VERSION}")
    if data.get("kind") not in KINDS:
        raise _bad(path, f"kind must be one of {', '.join(KINDS)}")
    prompts_raw = data.get("prompts")
    if not isinstance(prompts_raw, list) or not prompts_raw:
        raise _bad(path, "has no prompts")
    prompts = []
    for i, p in enumerate(prompts_raw):
        if not isinstance(p, dict) or not isinstance(p.get("positions"), list):
            raise _bad(path, f"prompts[{i}] needs positions")
        positions = tuple(
            _position(path, s, f"prompts[{i}].positions[{j}]") for j, s in enumerate(p["positions"])
        )
        prompts.append(
            ReferencePrompt(name=str(p.get("name", i)), text=str(p.get("text", "")), positions=positions)
        )
    collisions = data.get("vocab_collisions")
    if collisions is not None and (
        not isinstance(collisions, dict) or not all(_whole(v) and v > 0 for v in collisions.values())
    ):
        raise _bad(path, "vocab_collisions must map strings to counts")
    for field_name in ("settings", "tokenizer"):
        if not isinstance(data.get(field_name) or {}, dict):
            raise _bad(path, f"{field_name} must be a mapping")
    settings = dict(data.get("settings") or {})
    top_k = settings.get("top_k")
    if top_k is not None and (not _whole(top_k) or not 1 <= top_k <= MAX_TOP_K):
        raise _bad(path, f"settings.top_k {top_k!r} is not a whole number in 1..{MAX_TOP_K}")
    if not isinstance(settings.get("add_bos_token", False), bool):
        raise _bad(path, "settings.add_bos_token must be true or false")
    tokenizer = dict(data.get("tokenizer") or {})
    if not all(isinstance(tokenizer.get(k), (str, type(None))) for k in ("probe", "probe_ids_sha256")):
        raise _bad(path, "tokenizer.probe and tokenizer.probe_ids_sha256 must be text")
    return Reference(
        kind=data["kind"],
        model_id=str(data.get("model_id", "")),
        created=str(data.get("created", "")),
        settings=settings,
        tokenizer=tokenizer,
        vocab_collisions=dict(collisions) if isinstance(collisions, dict) else None,
        prompts=tuple(prompts),
    )


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def record_reference(
    client: TabbyClient,
    prompts: Sequence[Prompt],
    top_k: int = RECORD_TOP_K,
    positions_per_prompt: int = POSITIONS_PER_PROMPT,
) -> Reference:
    """Record a reference from a live deployment: prefixes via /v1/token/encode, top-K via one-token completions.

    Collisions are already collapsed by the server, so vocab_collisions stays unknown (None). Every answer must be
    log-probabilities (ServerError naming the position otherwise): nothing else may become a reference.
    """
    from .client import ServerError

    card = client.model()
    probe_ids = client.encode(TOKENIZER_PROBE)
    recorded = []
    for prompt in prompts:
        cuts = choose_prefixes(prompt.text, client.encode, positions_per_prompt)
        if not cuts:
            continue
        tops = client.next_token_logprobs([prefix for prefix, _ in cuts], top_k)
        for number, top in enumerate(tops, 1):
            problem = distribution_problem(top) if top is not None else None
            if problem is not None:
                raise ServerError(
                    f"not log-probabilities at prompt {prompt.name!r} position {number}: {problem}", 200
                )
        recorded.append(
            ReferencePrompt(
                name=prompt.name,
                text=prompt.text,
                positions=tuple(
                    Position(
                        prefix=prefix,
                        token_count=len(ids),
                        prefix_ids=tuple(ids),
                        top_ids=None,
                        top_tokens=tuple(k for k, _ in top),
                        top_logprobs=tuple(v for _, v in top),
                    )
                    for (prefix, ids), top in zip(cuts, tops)
                    if top is not None
                ),
            )
        )
    if not recorded:
        raise BadInput("no prompt yielded a usable prefix", "use longer prompts with several words")
    parameters = card.get("parameters") or {}
    return Reference(
        kind=KIND_DEPLOYMENT,
        model_id=str(card.get("id", "")),
        created=_now(),
        settings={
            "top_k": top_k,
            "add_bos_token": False,
            "positions_per_prompt": positions_per_prompt,
            "cache_mode": parameters.get("cache_mode"),
            "max_seq_len": parameters.get("max_seq_len"),
            "source": client.url,
        },
        tokenizer={
            "probe": TOKENIZER_PROBE,
            "probe_ids_sha256": probe_identity(probe_ids),
            "tokenizer_json_sha256": None,
        },
        vocab_collisions=None,
        prompts=tuple(recorded),
    )


class ReferenceBackend(Protocol):
    """A local model that can give full next-token distributions (exllamav3, or a test model)."""

    model_id: str
    kind: str
    tokenizer_sha256: str | None

    def encode(self, text: str) -> list[int]:
        """Token ids as the server would encode the prompt (no BOS, special tokens encoded)."""

    def pieces(self) -> list[str]:
        """Decoded string of every id, as TabbyAPI keys its top-K dict (get_id_to_piece_list(True))."""

    def logprobs_at(self, ids: list[int], counts: list[int]) -> Any:
        """Log-softmax (len(counts), vocab) of the token after ids[:n] for each n in counts (one forward)."""


def compute_reference(
    backend: ReferenceBackend,
    prompts: Sequence[Prompt],
    top_k: int = COMPUTE_TOP_K,
    positions_per_prompt: int = POSITIONS_PER_PROMPT,
    progress: Callable[[int, int], None] | None = None,
    settings: dict[str, Any] | None = None,
) -> Reference:
    """Compute a reference locally: exact distributions, stored as top-K with ids, plus the vocab's collisions.

    settings adds to (or overrides) what the file records it was made with (the entry point's backend, cache,
    versions, model commit).
    """
    import numpy as np

    from .kl import collision_counts

    pieces = backend.pieces()
    computed = []
    for index, prompt in enumerate(prompts):
        cuts = choose_prefixes(prompt.text, backend.encode, positions_per_prompt)
        if cuts:
            full = backend.encode(prompt.text)
            rows = backend.logprobs_at(full, [len(ids) for _, ids in cuts])
            positions = []
            for (prefix, ids), row in zip(cuts, rows):
                row = np.asarray(row, dtype=np.float64)
                order = np.argsort(-row, kind="stable")[:top_k]
                positions.append(
                    Position(
                        prefix=prefix,
                        token_count=len(ids),
                        prefix_ids=tuple(ids),
                        top_ids=tuple(int(i) for i in order),
                        top_tokens=tuple(pieces[i] for i in order),
                        top_logprobs=tuple(float(row[i]) for i in order),
                    )
                )
            computed.append(ReferencePrompt(name=prompt.name, text=prompt.text, positions=tuple(positions)))
        if progress:
            progress(index + 1, len(prompts))
    if not computed:
        raise BadInput("no prompt yielded a usable prefix", "use longer prompts with several words")
    return Reference(
        kind=backend.kind,
        model_id=backend.model_id,
        created=_now(),
        settings={
            "top_k": top_k,
            "add_bos_token": False,
            "positions_per_prompt": positions_per_prompt,
            "cache_mode": None,
            "max_seq_len": None,
            "source": SOURCE_COMPUTE,
            "prompts_sha256": prompts_sha256(prompts),
            **(settings or {}),
        },
        tokenizer={
            "probe": TOKENIZER_PROBE,
            "probe_ids_sha256": probe_identity(backend.encode(TOKENIZER_PROBE)),
            "tokenizer_json_sha256": backend.tokenizer_sha256,
        },
        vocab_collisions=collision_counts(pieces),
        prompts=tuple(computed),
    )
