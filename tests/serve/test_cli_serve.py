"""``gi-deploy serve``'s command line: what it says before any port opens."""

from __future__ import annotations

from typer.testing import CliRunner

from gi_deploy.cli import app


def test_binding_beyond_loopback_is_announced_and_a_bad_folder_refused(tmp_path):
    """--host 0.0.0.0 prints a warning that the endpoints are reachable from other machines; a folder with no
    bundle (or no serve extra) is one error line and exit code 1, no traceback."""
    r = CliRunner().invoke(app, ["serve", str(tmp_path / "none"), "--host", "0.0.0.0"])
    assert r.exit_code == 1
    assert "warning: binding 0.0.0.0" in r.output and "reachable from other machines" in r.output
    assert "error:" in r.output and "Traceback" not in r.output


def test_the_default_host_says_nothing(tmp_path):
    r = CliRunner().invoke(app, ["serve", str(tmp_path / "none")])
    assert r.exit_code == 1 and "warning: binding" not in r.output


def test_a_host_that_is_no_address_is_refused(tmp_path):
    r = CliRunner().invoke(app, ["serve", str(tmp_path), "--host", "my host"])
    assert r.exit_code == 1 and "--host must be an IP address" in r.output
