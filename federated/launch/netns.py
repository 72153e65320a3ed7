"""Sites in their own Linux network namespaces on one machine: a deployment beyond loopback, without other hosts.

:class:`SiteNetwork` builds a small private network (needs root: ``CAP_NET_ADMIN`` and
``CAP_SYS_ADMIN``, and iproute2's ``ip``)::

    host:    bridge  <prefix>.1/24           the SuperLink's address (python -m federated.launch.deploy --superlink-host)
    site i:  netns   veth <prefix>.(11+i)/24 its only link, plus its own loopback

Each site's namespace has its own loopback and one veth whose other end is on the bridge,
so a process started in it (:meth:`SiteNetwork.prefix`: ``ip netns exec <ns>``) reaches the
host only at the bridge's address; the host's ``127.0.0.1`` is not reachable from there (a
site's ``127.0.0.1`` is its own). Names carry a random token (unique per network) and the
/24 is a free one of ``10.231.0.0/16`` (checked against this machine's addresses and routes).
:meth:`SiteNetwork.close` (also the context manager's exit) kills whatever still runs in the
namespaces and deletes them and the bridge, which takes the veth pairs with them.

``python -m federated.launch.netns`` lists or removes networks left by a process that was killed
before it could clean up (``--remove-stale``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from typing import Sequence

from auditml_core.errors import UserError

log = logging.getLogger(__name__)
NAME_PREFIX = "flsite"  # every bridge / namespace / veth this module creates starts with it
SUPERNET = ipaddress.ip_network("10.231.0.0/16")  # private, rarely used; one /24 per network
HOST_OCTET, FIRST_SITE_OCTET = 1, 11


class NetnsUnavailable(UserError):
    """Network namespaces cannot be created here (not Linux, no ``ip``, or not privileged)."""


def _ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, argv, done.stdout, done.stderr)
    return done


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 of :data:`SUPERNET` that no address or route of this machine touches (random among the free)."""
    used = set()
    for args in (("-4", "-o", "addr", "show"), ("-4", "route", "show", "table", "all")):
        for match in re.finditer(r"\b10\.231\.(\d+)\.\d+", _ip(*args).stdout):
            used.add(int(match.group(1)))
    free = [k for k in range(1, 255) if k not in used]
    if not free:
        raise NetnsUnavailable(f"every /24 of {SUPERNET} is in use on this machine")
    return ipaddress.ip_network(f"10.231.{secrets.choice(free)}.0/24")


class SiteNetwork:
    """``n_sites`` network namespaces on a private bridge of this host; see the module docstring.

    Parameters
    ----------
    n_sites : how many site namespaces (1-200).

    Raises
    ------
    NetnsUnavailable
        When the first namespace cannot be created (the reason says why; nothing is left behind).
    """

    def __init__(self, n_sites: int):
        if not 1 <= n_sites <= 200:
            raise UserError(f"n_sites={n_sites}: give 1 to 200 sites")
        if not sys.platform.startswith("linux"):
            raise NetnsUnavailable(f"network namespaces need Linux (this is {sys.platform})")
        if shutil.which("ip") is None:
            raise NetnsUnavailable("iproute2's `ip` is not on PATH (apt-get install iproute2)")
        self.token = secrets.token_hex(3)
        self.bridge = f"{NAME_PREFIX}{self.token}"  # 12 characters: interface names stop at 15
        self.namespaces = [f"{NAME_PREFIX}{self.token}-{i}" for i in range(n_sites)]
        self._veths = [(f"{NAME_PREFIX}{self.token}h{i}", f"{NAME_PREFIX}{self.token}n{i}") for i in range(n_sites)]
        self._made: list[tuple[str, str]] = []  # ("netns"|"link", name) in creation order, for close()
        try:
            self._create_first_namespace()
        except (subprocess.CalledProcessError, OSError) as exc:
            why = getattr(exc, "stderr", "") or str(exc)
            raise NetnsUnavailable(
                f"cannot create a network namespace here ({why.strip()}): it needs root "
                "(CAP_NET_ADMIN and CAP_SYS_ADMIN)"
            ) from None
        try:
            self.subnet = _free_subnet()
            hosts = list(self.subnet.hosts())
            self.host_address = str(hosts[HOST_OCTET - 1])
            self.site_addresses = [str(hosts[FIRST_SITE_OCTET - 1 + i]) for i in range(n_sites)]
            self._build()
        except BaseException:
            self.close()
            raise

    def _create_first_namespace(self) -> None:
        _ip("netns", "add", self.namespaces[0])
        self._made.append(("netns", self.namespaces[0]))

    def _build(self) -> None:
        bits = self.subnet.prefixlen
        _ip("link", "add", self.bridge, "type", "bridge")
        self._made.append(("link", self.bridge))
        _ip("addr", "add", f"{self.host_address}/{bits}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, ns in enumerate(self.namespaces):
            if i > 0:
                _ip("netns", "add", ns)
                self._made.append(("netns", ns))
            host_end, site_end = self._veths[i]
            _ip("link", "add", host_end, "type", "veth", "peer", "name", site_end)
            self._made.append(("link", host_end))  # deleting either end deletes the pair
            _ip("link", "set", site_end, "netns", ns)
            _ip("link", "set", host_end, "master", self.bridge)
            _ip("link", "set", host_end, "up")
            _ip("addr", "add", f"{self.site_addresses[i]}/{bits}", "dev", site_end, netns=ns)
            _ip("link", "set", site_end, "up", netns=ns)
            _ip("link", "set", "lo", "up", netns=ns)  # the site's own loopback (its SuperNode's Runtime API)
        log.info(
            "site network %s: host %s, sites %s in namespaces %s",
            self.subnet,
            self.host_address,
            self.site_addresses,
            self.namespaces,
        )

    def prefix(self, i: int) -> list[str]:
        """The command prefix that runs a program in site ``i``'s namespace (in place: same PID, same files)."""
        return ["ip", "netns", "exec", self.namespaces[i]]

    def pids(self, i: int) -> list[int]:
        """Processes running in site ``i``'s namespace now."""
        done = _ip("netns", "pids", self.namespaces[i], check=False)
        return [int(p) for p in done.stdout.split()]

    def link_bytes(self, i: int) -> dict[str, int]:
        """Bytes received and sent by site ``i``'s veth so far (its only way out of the namespace)."""
        stats = json.loads(_ip("-s", "-j", "link", "show", "dev", self._veths[i][1], netns=self.namespaces[i]).stdout)
        s64 = stats[0]["stats64"]
        return {"rx": int(s64["rx"]["bytes"]), "tx": int(s64["tx"]["bytes"])}

    def reachable(self, i: int, targets: Sequence[tuple[str, int]], *, timeout_s: float = 2.0) -> list[bool]:
        """For each ``(host, port)``: whether a TCP connection from inside site ``i``'s namespace succeeds."""
        probe = (
            "import socket,sys\n"
            "for host, port in %r:\n"
            "    s = socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET); s.settimeout(%r)\n"
            "    try: s.connect((host, port)); print(1)\n"
            "    except OSError: print(0)\n"
            "    finally: s.close()\n"
        ) % ([(str(h), int(p)) for h, p in targets], float(timeout_s))
        done = subprocess.run(
            [*self.prefix(i), sys.executable, "-c", probe], capture_output=True, text=True, timeout=30, check=True
        )
        return [line == "1" for line in done.stdout.split()]

    def close(self) -> list[str]:
        """Kill what still runs in the namespaces, delete them and the bridge; return what could not be removed."""
        left = []
        for kind, name in reversed(self._made):
            if kind == "netns":
                _kill_namespace_processes(name)
                done = _ip("netns", "del", name, check=False)
            else:
                done = _ip("link", "del", name, check=False)
            if done.returncode != 0 and "Cannot find" not in done.stderr and "No such" not in done.stderr:
                left.append(f"{kind} {name}: {done.stderr.strip()}")
        self._made.clear()
        for problem in left:
            log.error("site network: could not remove %s", problem)
        return left

    def __enter__(self) -> "SiteNetwork":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _kill_namespace_processes(ns: str, timeout_s: float = 5.0) -> None:
    """SIGKILL every process in namespace ``ns`` (all of them were started in it by whoever owns it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    log.error("processes still in namespace %s after %.0f s", ns, timeout_s)


def leftover_networks() -> dict[str, dict[str, list[str]]]:
    """Site networks of this module that exist now, by token: ``{token: {"namespaces": [...], "links": [...]}}``.

    Links are bridges and host-side veth ends; the site-side ends live in the namespaces.
    """
    found: dict[str, dict[str, list[str]]] = {}
    tok = rf"{NAME_PREFIX}([0-9a-f]{{6}})"
    for m in re.finditer(rf"^({tok}-\d+)\b", _ip("netns", "list", check=False).stdout, re.M):
        found.setdefault(m.group(2), {"namespaces": [], "links": []})["namespaces"].append(m.group(1))
    for m in re.finditer(rf"^\d+: ({tok}(?:h\d+)?)[:@]", _ip("-o", "link", "show").stdout, re.M):
        found.setdefault(m.group(2), {"namespaces": [], "links": []})["links"].append(m.group(1))
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m federated.launch.netns [--remove-idle]``: list the site networks that exist (left by a killed run?)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m federated.launch.netns", description=main.__doc__)
    p.add_argument(
        "--remove-idle",
        action="store_true",
        help="delete the networks in whose namespaces nothing runs (a network in use is left alone)",
    )
    args = p.parse_args(argv)
    found = leftover_networks()
    print(json.dumps(found, indent=1))
    if args.remove_idle:
        for token, parts in found.items():
            busy = [ns for ns in parts["namespaces"] if _ip("netns", "pids", ns, check=False).stdout.split()]
            if busy:
                print(f"{token}: in use ({', '.join(busy)}), left alone")
                continue
            for ns in parts["namespaces"]:
                _ip("netns", "del", ns, check=False)
            for link in parts["links"]:
                _ip("link", "del", link, check=False)
            print(f"{token}: removed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
