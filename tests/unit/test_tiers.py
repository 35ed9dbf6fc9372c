"""The test tiers of tests/conftest.py: which CI values mean CI, and that under CI every
kind of skip of a kernel or e2e test fails while the unit tier may still skip. The hooks
run for real: a throwaway suite holding a copy of the conftest, run by pytest in a
subprocess as root or not (os.geteuid replaced there by a plugin, so this runs as anyone),
its outcomes read from the JUnit XML it writes."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

CONFTEST = pathlib.Path(__file__).resolve().parents[1] / "conftest.py"


def tiers():
    spec = importlib.util.spec_from_file_location("tiers_conftest", CONFTEST)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("value", ["true", "True", "TRUE", "1", "yes", "Yes", "on", "github", "2", " true "])
def test_ci_values_that_mean_ci(value):
    assert tiers().ci_enabled({"CI": value}) is True


@pytest.mark.parametrize("value", ["", "0", "false", "False", "FALSE", "no", "No", "NO", " ", " false "])
def test_ci_values_that_do_not(value):
    assert tiers().ci_enabled({"CI": value}) is False


def test_an_unset_ci_is_not_ci():
    assert tiers().ci_enabled({"OTHER": "true"}) is False


KERNEL_TESTS = '''
import pytest

@pytest.fixture
def needs_missing_module():
    pytest.importorskip("no_such_module_of_nodeagent")

def test_importorskip_in_a_fixture(needs_missing_module):
    pass

@pytest.mark.skip(reason="marked")
def test_skip_marker():
    pass

@pytest.mark.skipif(True, reason="condition")
def test_skipif_marker():
    pass

def test_skip_in_the_body():
    pytest.skip("told to")

@pytest.mark.xfail(reason="known", strict=False)
def test_xfail_is_not_a_skip():
    assert False

def test_runs():
    pass
'''
WHOLE_MODULE = 'import pytest\npytest.importorskip("no_such_module_of_nodeagent")\n\ndef test_never():\n    pass\n'
UNIT_TESTS = 'import pytest\n\ndef test_unit_skip():\n    pytest.skip("allowed")\n\ndef test_unit_runs():\n    pass\n'
EUID_PLUGIN = 'import os\nos.geteuid = lambda: int(os.environ["FAKE_EUID"])\n'
ROOT, USER = 0, 1000
OUTCOME = {"failure": "failed", "error": "error", "skipped": "skipped"}  # JUnit XML child of a testcase


@pytest.fixture
def suite(tmp_path):
    tests = tmp_path / "tests"
    for tier in ("unit", "kernel", "e2e"):
        (tests / tier).mkdir(parents=True)
    (tests / "conftest.py").write_text(CONFTEST.read_text())
    (tests / "kernel" / "test_k.py").write_text(KERNEL_TESTS)
    (tests / "e2e" / "test_whole_module.py").write_text(WHOLE_MODULE)
    (tests / "unit" / "test_u.py").write_text(UNIT_TESTS)
    (tmp_path / "pytest.ini").write_text('[pytest]\nmarkers =\n    root: needs root\n')
    (tmp_path / "fake_euid.py").write_text(EUID_PLUGIN)
    return tmp_path


def outcomes(suite, ci: str | None, *args: str, euid: int = ROOT) -> dict[str, str]:
    """Run the throwaway suite; test or module name -> passed/failed/skipped/error."""
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(FAKE_EUID=str(euid), PYTHONPATH=os.pathsep.join([str(suite), *sys.path]))
    if ci is not None:
        env["CI"] = ci
    report = suite / "report.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "fake_euid", "-q",
                    "--rootdir", str(suite), "-c", str(suite / "pytest.ini"), f"--junitxml={report}", *args, "tests"],
                   cwd=suite, env=env, capture_output=True, text=True, timeout=120)
    found = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        kinds = [OUTCOME[child.tag] for child in case if child.tag in OUTCOME]
        found[case.get("name") or case.get("classname")] = kinds[0] if kinds else "passed"
    return found


@pytest.mark.parametrize("ci", ["1", "True", "yes"])
def test_under_ci_every_skip_of_a_root_test_fails(suite, ci):
    # A failed collection would end the run there (as it does in CI); here the rest goes on.
    assert outcomes(suite, ci, "--continue-on-collection-errors") == {
        "test_importorskip_in_a_fixture": "error",  # failed in setup
        "test_skip_marker": "error", "test_skipif_marker": "error", "test_skip_in_the_body": "failed",
        "test_xfail_is_not_a_skip": "skipped", "test_runs": "passed",
        "tests.e2e.test_whole_module": "error",  # the module skipped at import
        "test_unit_skip": "skipped", "test_unit_runs": "passed"}


@pytest.mark.parametrize("ci", [None, "0", "false", "No"])
def test_outside_ci_root_tests_may_skip(suite, ci):
    assert outcomes(suite, ci) == {
        "test_importorskip_in_a_fixture": "skipped", "test_skip_marker": "skipped",
        "test_skipif_marker": "skipped", "test_skip_in_the_body": "skipped",
        "test_xfail_is_not_a_skip": "skipped", "test_runs": "passed",
        "tests.e2e.test_whole_module": "skipped", "test_unit_skip": "skipped", "test_unit_runs": "passed"}


def test_the_root_marker_selects_the_kernel_and_e2e_tiers(suite):
    whole_module = "--ignore=tests/e2e/test_whole_module.py"  # it skips while collected, before any -m
    unit = outcomes(suite, None, "-m", "not root", whole_module)
    assert unit == {"test_unit_skip": "skipped", "test_unit_runs": "passed"}
    root = outcomes(suite, None, "-m", "root", "-k", "test_runs or test_skip_marker", whole_module)
    assert set(root) == {"test_runs", "test_skip_marker"}


def test_not_root_under_ci_fails_every_root_test_and_names_why(suite):
    found = outcomes(suite, "true", "--continue-on-collection-errors", euid=USER)
    assert found == {
        "test_importorskip_in_a_fixture": "error", "test_skip_marker": "error", "test_skipif_marker": "error",
        "test_skip_in_the_body": "error", "test_xfail_is_not_a_skip": "error", "test_runs": "error",
        "tests.e2e.test_whole_module": "error", "test_unit_skip": "skipped", "test_unit_runs": "passed"}
    assert "CI='true': needs root and a real kernel" in (suite / "report.xml").read_text()


def test_not_root_outside_ci_skips_every_root_test(suite):
    assert outcomes(suite, None, euid=USER) == {
        "test_importorskip_in_a_fixture": "skipped", "test_skip_marker": "skipped", "test_skipif_marker": "skipped",
        "test_skip_in_the_body": "skipped", "test_xfail_is_not_a_skip": "skipped", "test_runs": "skipped",
        "tests.e2e.test_whole_module": "skipped", "test_unit_skip": "skipped", "test_unit_runs": "passed"}
