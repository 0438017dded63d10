"""The vision rows of the conformance table (docs/conformance.*, generator/verify/conformance.py):
tests/test_vision_*.py record their measurements as the family `<family>/vision` (checks `vision`
and `image_end_to_end`, builds fp32 and s8) and fail when one outgrows the committed baseline."""

from __future__ import annotations

from generator.verify import conformance


def record(family: str, build: str, check: str, cos: float, rel: float, lim: dict, passed: bool, reference: str,
           quirks: list[str]) -> str | None:
    """Store one vision measurement; returns the complaint of an error that outgrew the committed value."""
    assert check in conformance.VISION_CHECKS, check
    return conformance.record(f"{family}/vision", build, check, max_rel_err=rel, min_cosine=cos, passed=passed,
                              reference=reference, quirks=quirks, thresholds=lim)


def assert_committed(family: str):
    """The committed baseline has the family's vision rows, every check at every build, all passing."""
    checks = conformance.committed()["families"].get(f"{family}/vision", {}).get("checks", {})
    assert set(checks) == set(conformance.VISION_CHECKS), (family, sorted(checks))
    for check, builds in checks.items():
        assert set(builds) == set(conformance.BUILDS) and all(b["passed"] for b in builds.values()), (family, check)
