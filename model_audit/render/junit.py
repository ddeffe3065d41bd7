"""JUnit XML of a gate run: one testcase per check, for CI systems that show test results."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the gate imports this module to write its outputs: types only, no cycle
    from ..commands.gate import GateResult


def junit_xml(result: "GateResult") -> str:
    """JUnit XML: one testcase per check; failed checks are failures, not-run ones skipped."""
    suite = ET.Element("testsuite", name="model-audit gate", tests=str(len(result.checks)),
                       failures=str(sum(c.passed is False for c in result.checks)),
                       skipped=str(sum(c.passed is None for c in result.checks)),
                       time=f"{result.seconds:.3f}")
    for check in result.checks:
        case = ET.SubElement(suite, "testcase", classname="model_audit.gate", name=check.name)
        if check.passed is False:
            ET.SubElement(case, "failure", message=check.message).text = (
                f"value: {check.value!r}; limit: {check.limit!r}")
        elif check.passed is None:
            ET.SubElement(case, "skipped", message=check.message)
        ET.SubElement(case, "system-out").text = check.message
    cmp = result.comparison
    if cmp is not None and cmp.regression is not None:  # information: passes, says the group
        case = ET.SubElement(suite, "testcase", classname="model_audit.gate",
                             name="regression_bisection")
        ET.SubElement(case, "system-out").text = cmp.regression.summary()
        suite.set("tests", str(int(suite.get("tests", "0")) + 1))
    if result.error:
        case = ET.SubElement(suite, "testcase", classname="model_audit.gate", name="gate")
        ET.SubElement(case, "error", message=result.error)
    suites = ET.Element("testsuites")
    suites.append(suite)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True)
