"""JUnit XML of a gate run: one testcase per check, for CI systems that show test results."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any, Mapping


def junit_xml(gate: Mapping[str, Any]) -> str:
    """JUnit XML of ``gate.json`` (a :class:`~model_audit.results.gate.GateResult`'s
    ``to_dict()``): one testcase per check; failed checks are failures, not-run ones skipped."""
    checks = gate["checks"]
    suite = ET.Element("testsuite", name="model-audit gate", tests=str(len(checks)),
                       failures=str(sum(c["passed"] is False for c in checks)),
                       skipped=str(sum(c["passed"] is None for c in checks)),
                       time=f"{gate['seconds']:.3f}")
    for check in checks:
        case = ET.SubElement(suite, "testcase", classname="model_audit.gate", name=check["name"])
        if check["passed"] is False:
            ET.SubElement(case, "failure", message=check["message"]).text = (
                f"value: {check['value']!r}; limit: {check['limit']!r}")
        elif check["passed"] is None:
            ET.SubElement(case, "skipped", message=check["message"])
        ET.SubElement(case, "system-out").text = check["message"]
    regression = (gate.get("comparison") or {}).get("regression") or {}
    if "summary" in regression:  # information: passes, says the group
        case = ET.SubElement(suite, "testcase", classname="model_audit.gate",
                             name="regression_bisection")
        ET.SubElement(case, "system-out").text = regression["summary"]
        suite.set("tests", str(int(suite.get("tests", "0")) + 1))
    if gate.get("error"):
        case = ET.SubElement(suite, "testcase", classname="model_audit.gate", name="gate")
        ET.SubElement(case, "error", message=gate["error"])
    suites = ET.Element("testsuites")
    suites.append(suite)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True)
