"""Render a VerifyReport: one JSON object for machines, JUnit XML for CI systems."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from ..atomic import write_text
from ..redact import printable, redact
from .checks import VerifyReport


def report_dict(report: VerifyReport) -> dict[str, Any]:
    """The --json object: passed, checks [{name, passed, detail}], kl {...} or null, top1_agreement."""
    outcome = report.kl
    summary = outcome.summary if outcome else None
    kl = None
    if outcome is not None and summary is not None:
        kl = {
            **summary.as_dict(),
            "threshold": outcome.threshold,
            "threshold_source": outcome.threshold_source,
            "estimator": "lower bound: top-K coarse-grained KL(reference || served), see docs/verify.md",
        }
    return {
        "passed": report.passed,
        "url": report.url,
        "checks": [
            {
                "name": c.name,
                "passed": c.passed,
                "detail": c.detail,
                "skipped": c.skipped,
                "seconds": round(c.seconds, 3),
            }
            for c in report.checks
        ],
        "model": report.model,
        "kl": kl,
        "top1_agreement": summary.top1_agreement if summary else None,
        "per_position": [
            {"prompt": r.prompt, "tokens": r.tokens, "kl": r.kl, "top1_match": r.top1_match}
            for r in (outcome.per_position if outcome else ())
        ],
        "timing": {
            "kl_requests_s": round(outcome.server_seconds, 3) if outcome else 0.0,
            "total_s": round(report.total_seconds, 3),
        },
    }


def junit_suite(report: VerifyReport, name: str = "deploy verify") -> ET.Element:
    """One JUnit testsuite element: a testcase per check (failure or skipped when not passed)."""
    failures = sum(1 for c in report.checks if not c.passed and not c.skipped)
    skipped = sum(1 for c in report.checks if c.skipped)
    suite = ET.Element(
        "testsuite",
        name=name,
        tests=str(len(report.checks)),
        failures=str(failures),
        errors="0",
        skipped=str(skipped),
        time=f"{report.total_seconds:.3f}",
    )
    ET.SubElement(ET.SubElement(suite, "properties"), "property", name="url", value=report.url)
    for check in report.checks:
        case = ET.SubElement(
            suite, "testcase", classname="deploy.verify", name=check.name, time=f"{check.seconds:.3f}"
        )
        if check.skipped:
            ET.SubElement(case, "skipped", message=check.detail)
        elif not check.passed:
            ET.SubElement(
                case, "failure", message=check.detail, type="VerificationFailed"
            ).text = check.detail
        else:
            ET.SubElement(case, "system-out").text = check.detail
    return suite


def junit_document(suites: ET.Element) -> str:
    """Serialize a <testsuites> element as a JUnit XML document, every secret the run read redacted and
    control characters (which XML 1.0 cannot carry) escaped."""
    for element in suites.iter():
        if element.text:
            element.text = printable(redact(element.text), 10_000)
        for key, value in element.attrib.items():
            element.attrib[key] = printable(redact(value), 10_000)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"


def junit_xml(report: VerifyReport) -> str:
    """A JUnit XML document holding the report's one testsuite."""
    suites = ET.Element("testsuites")
    suites.append(junit_suite(report))
    return junit_document(suites)


def write_junit(report: VerifyReport, path: Path) -> None:
    """Write the JUnit file atomically."""
    write_text(path, junit_xml(report))
