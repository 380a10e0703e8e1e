"""tests/ensure_servers.sh, the step of `make test` that installs Prometheus, Alertmanager and Chromium.

Each test runs the script with a PATH of fake `id`, `sudo` and `apt-get` commands and a binaries'
lookup path that holds only what the test puts there, so nothing is installed or removed here.
The fake machines have Chromium unless a test says otherwise (``browser=False``).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "ensure_servers.sh"
BOTH = "prometheus prometheus-alertmanager"
APT = "env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends"
NEEDS_BOTH = f"make test needs prometheus and prometheus-alertmanager: sudo apt-get install {BOTH}\n"


def _executable(path: Path, body: str) -> None:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def _machine(
    tmp_path: Path,
    *,
    uid: int = 1000,
    sudo: bool | None = None,
    apt: bool = True,
    installed: tuple[str, ...] = (),
    browser: bool = True,
) -> tuple[Path, Path]:
    """A fake machine: ``bin`` (PATH: id, env, maybe sudo, maybe apt-get) and ``servers`` (the lookup path).

    ``sudo``: None = no sudo, True = passwordless, False = asks for a password (``-n`` fails).
    The fake apt-get logs its arguments and, on ``install``, puts the packages' binaries in ``servers``.
    """
    bin_dir, servers = tmp_path / "bin", tmp_path / "servers"
    bin_dir.mkdir()
    servers.mkdir()
    _executable(bin_dir / "id", f"echo {uid}")
    (bin_dir / "env").symlink_to("/usr/bin/env")
    if sudo is not None:
        _executable(bin_dir / "sudo", "exit 0" if sudo else "echo 'sudo: a password is required' >&2; exit 1")
    if apt:
        _executable(
            bin_dir / "apt-get",
            f"""echo "apt-get $*" >> {tmp_path}/apt.log
for arg in "$@"; do
  case $arg in
    prometheus) : >{servers}/prometheus; : >{servers}/promtool; /bin/chmod +x {servers}/* ;;
    prometheus-alertmanager) : >{servers}/prometheus-alertmanager; : >{servers}/amtool; /bin/chmod +x {servers}/* ;;
    chromium) : >{servers}/chromium; /bin/chmod +x {servers}/* ;;
  esac
done""",
        )
    for name in (*installed, "chromium") if browser else installed:
        _executable(servers / name, "exit 0")
    return bin_dir, servers


def _run(bin_dir: Path, servers: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/bash", str(SCRIPT), *args],
        env={"PATH": str(bin_dir), "SERVERS_LOOKUP_PATH": str(servers)},
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize("alertmanager", ["prometheus-alertmanager", "alertmanager"])
def test_installed_servers_need_nothing_and_print_nothing(alertmanager: str, tmp_path: Path) -> None:
    bin_dir, servers = _machine(tmp_path, installed=("prometheus", "promtool", alertmanager, "amtool"))
    result = _run(bin_dir, servers)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert not (tmp_path / "apt.log").exists()


def test_root_installs_both_packages_with_apt_get(tmp_path: Path) -> None:
    bin_dir, servers = _machine(tmp_path, uid=0)
    result = _run(bin_dir, servers, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["apt-get update -qq", f"{APT} {BOTH}"]
    assert result.stderr == f"make test: installing {BOTH} (the Prometheus and Alertmanager tests run them)\n"
    assert not (tmp_path / "apt.log").exists()  # a dry run runs nothing


def test_a_user_with_passwordless_sudo_installs_through_sudo(tmp_path: Path) -> None:
    bin_dir, servers = _machine(tmp_path, sudo=True)
    result = _run(bin_dir, servers, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["sudo -n apt-get update -qq", f"sudo -n {APT} {BOTH}"]


def test_only_the_missing_package_is_installed(tmp_path: Path) -> None:
    bin_dir, servers = _machine(tmp_path, uid=0, installed=("prometheus", "promtool"))
    result = _run(bin_dir, servers, "--dry-run")
    assert result.stdout.splitlines()[-1] == f"{APT} prometheus-alertmanager"
    (tmp_path / "b").mkdir()
    bin_dir, servers = _machine(tmp_path / "b", uid=0, installed=("prometheus", "alertmanager", "amtool"))
    result = _run(bin_dir, servers, "--dry-run")
    assert result.stdout.splitlines()[-1] == f"{APT} prometheus"  # promtool is missing


@pytest.mark.parametrize("sudo", [None, False], ids=["no sudo", "sudo asks for a password"])
def test_without_root_or_passwordless_sudo_one_line_says_what_to_install(sudo: bool | None, tmp_path: Path) -> None:
    bin_dir, servers = _machine(tmp_path, sudo=sudo)
    result = _run(bin_dir, servers)
    assert (result.returncode, result.stdout, result.stderr) == (1, "", NEEDS_BOTH)


def test_the_line_names_only_the_missing_package(tmp_path: Path) -> None:
    bin_dir, servers = _machine(tmp_path, installed=("prometheus-alertmanager", "amtool"))
    result = _run(bin_dir, servers)
    assert (result.returncode, result.stderr) == (1, "make test needs prometheus: sudo apt-get install prometheus\n")


def test_without_apt_get_one_line_points_to_the_upstream_downloads(tmp_path: Path) -> None:
    bin_dir, servers = _machine(tmp_path, uid=0, apt=False)
    result = _run(bin_dir, servers)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("make test needs prometheus and prometheus-alertmanager: install Prometheus")
    assert "https://prometheus.io/download/" in result.stderr


def test_an_install_runs_apt_get_and_then_finds_the_binaries(tmp_path: Path) -> None:
    bin_dir, servers = _machine(tmp_path, uid=0)
    result = _run(bin_dir, servers)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "apt.log").read_text().splitlines() == [
        "apt-get update -qq",
        f"apt-get install -y -qq --no-install-recommends {BOTH}",
    ]
    assert _run(bin_dir, servers).stderr == ""  # the second time there is nothing to do


def test_a_failed_install_ends_with_the_one_line(tmp_path: Path) -> None:
    bin_dir, servers = _machine(tmp_path, uid=0)
    _executable(bin_dir / "apt-get", "exit 100")
    result = _run(bin_dir, servers)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] + "\n" == NEEDS_BOTH


def test_a_missing_chromium_is_installed_for_the_html_report_tests(tmp_path: Path) -> None:
    servers_installed = ("prometheus", "promtool", "prometheus-alertmanager", "amtool")
    bin_dir, servers = _machine(tmp_path, uid=0, installed=servers_installed, browser=False)
    result = _run(bin_dir, servers)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "make test: installing chromium (the HTML report tests open reports in it)\n"
    assert (tmp_path / "apt.log").read_text().splitlines()[
        -1
    ] == "apt-get install -y -qq --no-install-recommends chromium"
    assert _run(bin_dir, servers).stderr == ""


def test_debian_or_ubuntu_chromium_names_count_as_installed(tmp_path: Path) -> None:
    installed = ("prometheus", "promtool", "prometheus-alertmanager", "amtool", "chromium-browser")
    bin_dir, servers = _machine(tmp_path, installed=installed, browser=False)
    assert _run(bin_dir, servers).returncode == 0


def test_all_three_missing_are_named_in_one_line(tmp_path: Path) -> None:
    bin_dir, servers = _machine(tmp_path, browser=False)
    result = _run(bin_dir, servers)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        "make test needs prometheus, prometheus-alertmanager and chromium: "
        "sudo apt-get install prometheus prometheus-alertmanager chromium\n"
    )
    (tmp_path / "b").mkdir()
    bin_dir, servers = _machine(tmp_path / "b", uid=0, browser=False)
    result = _run(bin_dir, servers, "--dry-run")
    assert result.stdout.splitlines()[-1] == f"{APT} {BOTH} chromium"
    assert "(the Prometheus, Alertmanager and HTML report tests run them)" in result.stderr


def test_without_apt_get_a_missing_chromium_is_named_alone(tmp_path: Path) -> None:
    servers_installed = ("prometheus", "promtool", "prometheus-alertmanager", "amtool")
    bin_dir, servers = _machine(tmp_path, uid=0, apt=False, installed=servers_installed, browser=False)
    result = _run(bin_dir, servers)
    assert (result.returncode, result.stderr) == (
        1,
        "make test needs chromium: install Chromium and put chromium on PATH\n",
    )


def test_make_test_runs_the_install_step_before_pytest() -> None:
    result = subprocess.run(["make", "-n", "test"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    ensure = next(i for i, line in enumerate(lines) if "tests/ensure_servers.sh" in line)
    pytest_run = next(i for i, line in enumerate(lines) if "-m pytest" in line)
    assert ensure < pytest_run
