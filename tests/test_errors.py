"""The shared one-line helpers of ``initsearch.errors``, and the package's names loaded on first use."""
from __future__ import annotations

import subprocess
import sys

import pytest

from initsearch.errors import first_line, hide_password_of, is_finite_number, redact_url, scrub, url_password
from tests.conftest import PYTHON, subprocess_env


@pytest.mark.parametrize("value, finite", [
    (0, True), (-3, True), (2.5, True), (10**300, True), (10**400, False), (-(10**400), False),
    (float("inf"), False), (float("nan"), False), (True, False), ("1", False), (None, False),
])
def test_is_finite_number(value, finite):
    assert is_finite_number(value) is finite


def test_first_line_takes_the_first_line_with_or_without_the_type():
    exc = RuntimeError("  boom\nmore detail  ")
    assert first_line(exc) == "boom"
    assert first_line(exc, with_type=True) == "RuntimeError: boom"
    assert first_line(ValueError(""), with_type=True) == "ValueError" and first_line(ValueError("")) == ""
    assert first_line(RuntimeError("x" * 500), limit=10) == "x" * 10


@pytest.mark.parametrize("url, password", [
    ("postgresql://alice:s3cret@db/initsearch", "s3cret"),
    ("postgresql://alice:pa/ss?#x@db/initsearch", "pa/ss?#x"),  # SQLAlchemy accepts these; urlsplit does not
    ("http://alice:pw@127.0.0.1:bad/", "pw"),  # a malformed port
    ("postgresql://alice@db/x", None),
    ("initsearch.journal", None),
])
def test_url_password(url, password):
    assert url_password(url) == password


def test_redact_and_scrub_hide_the_password():
    assert redact_url("postgresql://alice:s3cret@db/x") == "postgresql://alice:***@db/x"
    assert redact_url("sqlite:///a.db") == "sqlite:///a.db"
    hide_password_of("http://bob:p%40ssw0rd@127.0.0.1:5000")
    assert scrub("failed: bob:p%40ssw0rd and p@ssw0rd") == "failed: bob:*** and ***"
    assert first_line(OSError("cannot reach http://bob:p%40ssw0rd@host")) == "cannot reach http://bob:***@host"


def test_a_password_that_holds_another_one_is_hidden_whole():
    # Ten nested pairs: a set iterates them in some order; replacing the short one first would leave a
    # piece of the long one shown, and with ten pairs some pair meets that order whatever the hash seed.
    for i in range(10):
        hide_password_of(f"postgresql://alice:zq{i}@db/x")
        hide_password_of(f"http://alice:zq{i}%21long@host")
        assert scrub(f"to http://alice:zq{i}%21long@host and zq{i}!long") == "to http://alice:***@host and ***"


def test_import_initsearch_loads_no_torch_until_a_public_name_is_used():
    code = ("import sys, initsearch; assert 'torch' not in sys.modules; import initsearch.errors; "
            "assert 'torch' not in sys.modules; print(initsearch.errors.PolicyError.__name__); "
            "f = initsearch.apply_policy; assert 'torch' in sys.modules; print(f.__module__)")
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["PolicyError", "initsearch.init.apply"]


def test_the_public_names_resolve_and_unknown_ones_fail():
    import initsearch

    for name in initsearch.__all__:
        assert getattr(initsearch, name) is not None
    assert {"apply_policy", "load_policy", "errors", "init"} <= set(dir(initsearch))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        initsearch.nope


def test_the_writer_keeps_site_packages_behind_the_standard_library(monkeypatch):
    from initsearch.tracking import delivery

    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.setattr(delivery, "PACKAGE_ROOT", sys.prefix + "/not-a-site-dir")
    assert delivery.writer_env("sqlite:///x.db")["PYTHONPATH"] == sys.prefix + "/not-a-site-dir"
    site_dir = sorted(delivery._site_dirs())[0]
    monkeypatch.setattr(delivery, "PACKAGE_ROOT", site_dir)
    assert "PYTHONPATH" not in delivery.writer_env("sqlite:///x.db")
