"""The verification checks against a live TabbyAPI endpoint: liveness, readiness, function, tokenizer, KL.

`run_verify(VerifyRequest) -> VerifyReport` is the whole pipeline stage; the CLI (and `deploy up`, which knows
the expected model from its deployment state) only build the request and render the report.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..redact import printable
from .client import ServerError, TabbyClient
from .kl import KlSummary, distribution_problem, position_kl, side_from_entries, summarize
from .limits import REQUEST_TIMEOUT_S, VERIFY_TIMEOUT_S
from .readiness import Expectations, model_problems, served_model
from .reference import (
    KIND_DEPLOYMENT,
    KIND_FULL_PRECISION,
    KIND_QUANTIZED,
    SOURCE_COMPUTE,
    TOKENIZER_PROBE,
    Reference,
    probe_identity,
)

# With a full-precision reference and no --max-kl, the served mean may exceed the profile's measured
# KL(FP16 || quant) for the expected quant by this factor. Why 1.5: our figure is a lower bound (top-K coarse
# graining) on different text than the card's wikitext, so it sits near or below the card's value for a healthy
# quant, while the next smaller quant in the GLM-4.7 catalog has >= 1.3-2x the KL (4bpw 0.136 vs 3bpw 0.285,
# 3bpw vs 2bpw 0.759): a wrong branch, broken weights or a broken cache lands well above 1.5x. It cannot tell
# 6 from 8 bpw (0.078 vs 0.072); pin --max-kl for that. A deployed mix has no measured KL: its expected KL is the
# card-point estimate (log-KL interpolated at its size between its two branches, toolkit/plan/mix_quant.py), and
# the same factor applies to it.
KL_TOLERANCE_FACTOR = 1.5
# A reference computed in-process from a quant folder (the deployment reference, `deploy reference deployment`)
# is compared with the server serving that folder: the threshold is the serving-path bound for the server's cache
# mode (profiles/serving_path.yaml, toolkit/facts/serving_path.py).
# A reference recorded from an earlier deployment (benchmarks/spotcheck_gpu/RESULTS.md, measured on an H200): the
# serving path itself adds 5e-6 nats (BF16 served vs its plain forward); re-serving the same 6 bpw quant moved the
# mean by 0.0004; a cache change (FP16 -> 5,4) moved it by 0.013. 0.02 nats flags a changed quant or corrupted
# weights; record the reference at the deployment's own cache mode, and tighten with --max-kl when the earlier
# deployment is known to be identical.
REGRESSION_MAX_KL = 0.02
SERVED_TOP_K = 100
FUNCTION_PROMPT = "Reply with one short sentence: what is the capital of France?"
FUNCTION_MAX_TOKENS = 64


@dataclass(frozen=True)
class Check:
    """One check's outcome, as --json and JUnit report it."""

    name: str
    passed: bool
    detail: str
    seconds: float = 0.0
    skipped: bool = False


@dataclass(frozen=True)
class ExpectedKl:
    """The served quant's expected KL(FP16||quant) where the profile has no measurement of it (a planned mix: the
    card-point estimate), with where it comes from."""

    value: float
    source: str


@dataclass(frozen=True)
class VerifyRequest:
    """Everything `deploy verify` needs."""

    url: str
    api_key: str | None
    expect: Expectations = field(default_factory=Expectations)
    reference: Reference | None = None
    max_kl: float | None = None
    prompts: int | None = None
    profile: str = "glm-4.7"
    wait_s: float = 0.0
    top_k: int = SERVED_TOP_K
    timeout_s: float = REQUEST_TIMEOUT_S  # one request
    deadline_s: float = VERIFY_TIMEOUT_S  # every check together, after the wait
    split: str | None = None  # single | tp | layer: named with the serving-path bound
    expected_kl: ExpectedKl | None = (
        None  # a mix's estimate: the full-precision threshold when no quant is named
    )


@dataclass(frozen=True)
class PositionResult:
    """One measured position (kept so that two runs can be compared position by position)."""

    prompt: str
    tokens: int
    kl: float
    top1_match: bool


@dataclass(frozen=True)
class KlOutcome:
    """The KL check with what it measured: summary (None when nothing was measured), positions, threshold."""

    check: Check
    summary: KlSummary | None
    per_position: tuple[PositionResult, ...]
    server_seconds: float
    threshold: float
    threshold_source: str


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of every check, the KL outcome (None without a reference or when not run) and its cost."""

    url: str
    checks: tuple[Check, ...]
    model: dict[str, Any] | None
    kl: KlOutcome | None
    total_seconds: float

    @property
    def passed(self) -> bool:
        """Every check passed."""
        return all(c.passed for c in self.checks)


def _not_run(name: str, reason: str) -> Check:
    return Check(name=name, passed=False, detail=f"not run: {reason}", skipped=True)


class InvalidDistribution(ServerError):
    """The server's answer at one position is not a distribution of log-probabilities."""


def wait_until_ready(client: TabbyClient, wait_s: float) -> str | None:
    """Poll until /health and /v1/model answer 200 (TabbyAPI closes its port while loading), or time runs out.

    Every request of the wait ends by the wait's end. Returns None once the server answered anything (the checks
    then say what is wrong), else why it never did.
    """
    saved, client.deadline = client.deadline, time.monotonic() + wait_s
    silence: str | None = "no answer"
    try:
        while (client.time_left() or 0) > 0:
            try:
                health = client.health()
                silence = None
                if health.status_code == 503 and health.issues:
                    return None  # sticky: it will not recover
                if health.status_code == 200:
                    client.model()
                    return None
            except ServerError as error:
                if error.status is not None:
                    return None
                silence = str(error)
            time.sleep(min(1.0, max(0.0, client.time_left() or 0)))
        return silence
    finally:
        client.deadline = saved


def check_liveness(client: TabbyClient) -> Check:
    """The server can serve: /health 200, or, since TabbyAPI's /health stays 503 after any failed generation even
    while it serves (benchmarks/gpu_stack/RESULTS.md section 3), a one-token completion that succeeds now -- the
    rule of the image's healthcheck (dockerfiles/healthcheck.py)."""
    started = time.monotonic()
    health = client.health()
    if health.status_code == 200:
        return Check("liveness", True, "/health 200 healthy", time.monotonic() - started)
    if health.status_code != 503:
        return Check(
            "liveness", False, f"/health answered HTTP {health.status_code}", time.monotonic() - started
        )
    issues = (
        f"{len(health.issues)} earlier failed generation(s), last: {printable(str(health.issues[-1]), 300)}"
        if health.issues
        else ("no issues listed")
    )
    try:
        client.generate_one_token()
    except ServerError as error:
        return Check(
            "liveness",
            False,
            f"/health 503 ({issues}) and a one-token completion fails ({error}): the server cannot generate",
            time.monotonic() - started,
        )
    return Check(
        "liveness",
        True,
        f"/health 503 (sticky in TabbyAPI: {issues}), but a one-token completion succeeds: serving",
        time.monotonic() - started,
    )


def check_readiness(client: TabbyClient, expect: Expectations) -> tuple[Check, dict[str, Any] | None]:
    """/v1/model must name the expected model and report the expected cache mode and context."""
    started = time.monotonic()
    try:
        card = client.model()
    except ServerError as error:
        hint = (
            " (no model loaded yet: TabbyAPI answers 503 until the load finishes)"
            if error.status == 503
            else ""
        )
        return Check("readiness", False, f"{error}{hint}", time.monotonic() - started), None
    elapsed = time.monotonic() - started
    served = served_model(card)
    problems = model_problems(card, expect)
    summary = printable(
        f"model {served['id']!r}, cache_mode {served['cache_mode']}, max_seq_len {served['max_seq_len']}, "
        f"cache_size {served['cache_size']}",
        1000,
    )
    if problems:
        return Check("readiness", False, "; ".join(problems) + f" (serving {summary})", elapsed), served
    return Check("readiness", True, summary, elapsed), served


def check_function(client: TabbyClient, reasoning_markers: Sequence[str]) -> Check:
    """A chat completion returns text; reasoning, when present, arrives as reasoning_content (PR #295)."""
    started = time.monotonic()
    try:
        message = client.chat([{"role": "user", "content": FUNCTION_PROMPT}], FUNCTION_MAX_TOKENS)
    except ServerError as error:
        return Check("function", False, str(error), time.monotonic() - started)
    elapsed = time.monotonic() - started
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content") or ""
    if not isinstance(content, str) or not isinstance(reasoning, str):
        return Check("function", False, "chat message content is not text", elapsed)
    leaked = [m for m in reasoning_markers if m in content]
    if leaked:
        return Check(
            "function",
            False,
            f"reasoning markers {', '.join(leaked)} are in content: the server does not "
            "split reasoning (TabbyAPI needs PR #295 and model.reasoning: true)",
            elapsed,
        )
    kept = [m for m in reasoning_markers if m in reasoning]
    if kept:
        return Check(
            "function",
            False,
            f"reasoning markers {', '.join(kept)} are in reasoning_content: the reasoning split missed a tag, so "
            "the answer is not where clients read it (check reasoning_start_token/reasoning_end_token against "
            "the model's tokens)",
            elapsed,
        )
    if not content.strip() and not reasoning.strip():
        return Check("function", False, "chat completion returned no text", elapsed)
    parts = [f"content {len(content)} chars"] + (
        [f"reasoning_content {len(reasoning)} chars"] if reasoning else []
    )
    return Check("function", True, "chat completion returned " + ", ".join(parts), elapsed)


def check_tokenizer(client: TabbyClient, reference: Reference) -> Check:
    """The served tokenizer must encode the probe string to the reference's ids (else KL compares nonsense)."""
    started = time.monotonic()
    expected = reference.tokenizer.get("probe_ids_sha256")
    probe = reference.tokenizer.get("probe") or TOKENIZER_PROBE
    try:
        ids = client.encode(probe, add_bos_token=bool(reference.settings.get("add_bos_token", False)))
    except ServerError as error:
        return Check("tokenizer", False, str(error), time.monotonic() - started)
    elapsed = time.monotonic() - started
    if not expected:
        return Check("tokenizer", True, "reference records no tokenizer identity; not compared", elapsed)
    if probe_identity(ids) != expected:
        return Check(
            "tokenizer",
            False,
            "the served tokenizer encodes the probe differently from the reference's "
            "(a different model or tokenizer)",
            elapsed,
        )
    return Check("tokenizer", True, f"probe encodes identically ({len(ids)} tokens)", elapsed)


def serving_path_reference(reference: Reference) -> bool:
    """Computed in-process from a quant folder: serving that folder may differ from it only by the serving path."""
    return reference.kind == KIND_QUANTIZED and reference.settings.get("source") == SOURCE_COMPUTE


def serving_path_threshold(cache_mode: str | None, split: str | None) -> tuple[float, str]:
    """The serving-path bound for a cache mode as TabbyAPI spells it (an unreadable one gets FP16's, the tightest)."""
    from ..errors import BadInput
    from ..facts.serving_path import load_serving_path
    from ..plan.memory import parse_cache_mode

    try:
        canonical = parse_cache_mode(str(cache_mode)).label
        note = ""
    except BadInput:
        canonical, note = "FP16", f"cache mode {cache_mode!r} unreadable, FP16's bound; "
    bound = load_serving_path().bound(canonical, split)
    return bound.value, note + bound.source


def kl_threshold(request: VerifyRequest, served: dict[str, Any] | None) -> tuple[float, str]:
    """The bound the mean KL must stay under, and where it comes from (see the constants above)."""
    if request.max_kl is not None:
        return request.max_kl, "--max-kl"
    reference = request.reference
    assert reference is not None
    if serving_path_reference(reference):
        served_mode = (served or {}).get("cache_mode")
        return serving_path_threshold(request.expect.cache_mode or served_mode, request.split)
    served_id = (served or {}).get("id")
    if reference.kind != KIND_FULL_PRECISION:
        return REGRESSION_MAX_KL, f"regression bound {REGRESSION_MAX_KL} vs a {reference.kind} reference"
    from ..facts.profiles import load_profile

    profile = load_profile(request.profile)
    quant_name = request.expect.quant
    if quant_name is None and request.expected_kl is not None:
        expected = request.expected_kl
        return expected.value * KL_TOLERANCE_FACTOR, f"{expected.source} x {KL_TOLERANCE_FACTOR}"
    if quant_name is None and served_id:
        matches = [q.branch for q in profile.quants if q.branch in served_id]
        quant_name = max(matches, key=len) if matches else None
    if quant_name is not None:
        quant = profile.quant(quant_name)
        return (
            quant.kl_ref_quant * KL_TOLERANCE_FACTOR,
            f"{profile.name} {quant.branch}: measured KL {quant.kl_ref_quant:.4f} x {KL_TOLERANCE_FACTOR}",
        )
    worst = max(profile.quants, key=lambda q: q.kl_ref_quant)
    source = (
        f"no quant named (--expect-quant): {profile.name}'s worst quant {worst.branch} "
        f"{worst.kl_ref_quant:.4f} x {KL_TOLERANCE_FACTOR}"
    )
    return worst.kl_ref_quant * KL_TOLERANCE_FACTOR, source


def measure_kl(
    client: TabbyClient, reference: Reference, prompts: int | None, top_k: int
) -> tuple[list[PositionResult], float, int]:
    """Teacher-forced top-K at every reference prefix (one request per prompt) and the per-position KL bound.

    A position the server answers without logprobs even on retries is left out and counted.
    """
    collisions = reference.vocab_collisions or {}
    add_bos = bool(reference.settings.get("add_bos_token", False))
    results: list[PositionResult] = []
    seconds = 0.0
    missing = 0
    for prompt in reference.prompts[:prompts]:
        if not prompt.positions:
            continue
        started = time.monotonic()
        served = client.next_token_logprobs([p.prefix for p in prompt.positions], top_k, add_bos)
        seconds += time.monotonic() - started
        for number, (position, entries) in enumerate(zip(prompt.positions, served), 1):
            if entries is None:
                missing += 1
                continue
            problem = distribution_problem(entries)
            if problem is not None:
                raise InvalidDistribution(
                    f"not log-probabilities at prompt {prompt.name!r} position {number} "
                    f"({position.token_count} tokens): {problem}",
                    200,
                )
            ref_side = side_from_entries(position.entries(), collisions)
            served_side = side_from_entries(entries, collisions)
            results.append(
                PositionResult(
                    prompt=prompt.name,
                    tokens=position.token_count,
                    kl=position_kl(ref_side, served_side, collisions),
                    top1_match=ref_side.top1 == served_side.top1,
                )
            )
    return results, seconds, missing


def check_kl(client: TabbyClient, request: VerifyRequest, served: dict[str, Any] | None) -> KlOutcome:
    """KL spot-check against the reference: fail when the mean exceeds the threshold."""
    reference = request.reference
    assert reference is not None
    threshold, source = kl_threshold(request, served)
    top_k = request.top_k
    if reference.kind == KIND_DEPLOYMENT:
        # Same K as recorded: a TabbyAPI dict keeps the last of the colliding entries, so only equal K collapses
        # collisions identically on both sides (recorded references do not know the vocabulary's collisions).
        top_k = int(reference.settings.get("top_k") or top_k)
    started = time.monotonic()
    try:
        results, seconds, missing = measure_kl(client, reference, request.prompts, top_k)
    except ServerError as error:
        return KlOutcome(
            Check("kl", False, str(error), time.monotonic() - started), None, (), 0.0, threshold, source
        )
    elapsed = time.monotonic() - started
    if not results:
        problem = (
            "no position returned logprobs (does the server support logprobs?)"
            if missing
            else "the reference has no positions"
        )
        return KlOutcome(Check("kl", False, problem, elapsed), None, (), seconds, threshold, source)
    prompt_index = {name: i for i, name in enumerate(dict.fromkeys(r.prompt for r in results))}
    summary = summarize(
        [r.kl for r in results], [prompt_index[r.prompt] for r in results], [r.top1_match for r in results]
    )
    text = (
        f"mean KL {summary.mean:.4g} (95% CI {summary.ci95[0]:.4g}-{summary.ci95[1]:.4g}, lower bound) over "
        f"{summary.positions} positions, top-1 agreement {summary.top1_agreement:.3f}; threshold "
        f"{threshold:.4g} ({source})" + (f"; {missing} positions returned no logprobs" if missing else "")
    )
    return KlOutcome(
        Check("kl", summary.mean <= threshold, text, elapsed),
        summary,
        tuple(results),
        seconds,
        threshold,
        source,
    )


def profile_reasoning_markers(profile: str) -> tuple[str, ...]:
    """The reasoning start and end tokens of the model profile: what must never leak into a reply's content."""
    from ..facts.profiles import load_profile

    serving = load_profile(profile).serving
    return (serving.reasoning_start_token, serving.reasoning_end_token)


def run_verify(request: VerifyRequest, client: TabbyClient | None = None) -> VerifyReport:
    """Run every check in order; a failed prerequisite marks the later checks as not run (failed)."""
    started = time.monotonic()
    markers = request.expect.reasoning_markers or profile_reasoning_markers(request.profile)
    own = client is None
    client = client or TabbyClient(request.url, request.api_key, timeout_s=request.timeout_s)
    checks: list[Check] = []
    served: dict[str, Any] | None = None
    kl: KlOutcome | None = None
    try:
        silence = wait_until_ready(client, request.wait_s) if request.wait_s > 0 else None
        client.deadline = time.monotonic() + request.deadline_s
        try:
            if silence is not None:
                raise ServerError(f"no answer within --wait {request.wait_s:g} s ({silence})")
            checks.append(check_liveness(client))
        except ServerError as error:
            checks.append(Check("liveness", False, f"unreachable: {error}"))
            for name in ("readiness", "function") + (("tokenizer", "kl") if request.reference else ()):
                checks.append(_not_run(name, "the server is unreachable"))
            return VerifyReport(request.url, tuple(checks), None, None, time.monotonic() - started)
        readiness, served = check_readiness(client, request.expect)
        checks.append(readiness)
        checks.append(check_function(client, markers))
        if request.reference is not None:
            tokenizer = check_tokenizer(client, request.reference)
            checks.append(tokenizer)
            if tokenizer.passed:
                kl = check_kl(client, request, served)
                checks.append(kl.check)
            else:
                checks.append(_not_run("kl", "the tokenizer check failed"))
    finally:
        if own:
            client.close()
    return VerifyReport(request.url, tuple(checks), served, kl, time.monotonic() - started)
