"""A skip that is not on the allowed list fails the run, and says so."""

import pytest

from tests import skip_guard


@pytest.fixture
def isolated_skips(monkeypatch):
    """The guard's record of this inner run only (the outer run keeps its own)."""
    monkeypatch.setattr(skip_guard, "_skips", [])


def test_an_unlisted_skip_fails_the_run(pytester, isolated_skips):
    pytester.makepyfile("import pytest\n\ndef test_ok():\n    pass\n\n"
                        "def test_skips():\n    pytest.skip('no time today')\n")
    result = pytester.runpytest("-p", "tests.skip_guard")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*skipped (NOT ALLOWED)*test_skips*no time today*", "*1 skip(s) not on*"])


def test_a_listed_skip_and_an_xfail_pass(pytester, isolated_skips, monkeypatch):
    monkeypatch.setattr(skip_guard, "ALLOWED_SKIPS", {"needs a GPU": "the CI machine has none"})
    pytester.makepyfile("import pytest\n\n@pytest.mark.skipif(True, reason='needs a GPU')\ndef test_gpu():\n"
                        "    pass\n\n@pytest.mark.xfail(reason='known')\ndef test_known():\n    assert False\n")
    result = pytester.runpytest("-p", "tests.skip_guard")
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*skipped (allowed)*test_gpu*needs a GPU*"])
