"""No network in the tests: an audit hook that refuses connections and name lookups beyond this
machine, in the test process and in every Python process the tests start.

Each refusal raises in the code that tried, and is also appended to a log file, so that an
attempt a library catches and swallows still fails the session (``conftest``).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from pathlib import Path

LOG_ENV = "HISTOPRISM_TEST_NETWORK_LOG"


def _is_loopback(host) -> bool:
    host = host.decode() if isinstance(host, bytes) else str(host)
    if host in ("", "localhost", socket.gethostname()):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _refuse(what: str, error: type[OSError]) -> None:
    log = os.environ.get(LOG_ENV)
    if log:
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(f"{os.getpid()} {' '.join(sys.argv[:3])}: {what}\n")
    raise error(f"network access during the tests: {what}")


def _hook(event: str, args: tuple) -> None:
    if event == "socket.connect":
        sock, address = args
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            _refuse(f"connect {address}", ConnectionRefusedError)
    elif event == "socket.getaddrinfo" and args[0] is not None and not _is_loopback(args[0]):
        _refuse(f"getaddrinfo {args[0]}", socket.gaierror)


def install() -> None:
    """Add the hook to this process (an audit hook cannot be removed)."""
    sys.addaudithook(_hook)


def install_everywhere(folder: Path, log: Path) -> None:
    """The hook in this process, and in every Python process started with this environment: a
    ``sitecustomize`` in ``folder``, put first on PYTHONPATH, installs it at start-up."""
    os.environ[LOG_ENV] = str(log)
    tests = Path(__file__).resolve().parent
    (folder / "sitecustomize.py").write_text(
        f"import sys\nsys.path.insert(0, {str(tests)!r})\nimport netguard\n"
        f"sys.path.remove({str(tests)!r})\nnetguard.install()\n"
    )
    path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(folder), path] if path else [str(folder)])
    install()


def attempts(log: Path) -> list[str]:
    """What was refused so far, in every process."""
    return log.read_text(encoding="utf-8").splitlines() if log.exists() else []
