"""Host networking for QEMU VMs: the Linux bridge that is the host's vSwitch, one tap per VM NIC.

What the agent needs of the host's network, and nothing else:

- make and remove bridges, taps (persistent, attached to a bridge), the ifb that shapes a tap's ingress;
- read byte and packet counters of a tap or a bridge from ``/sys/class/net/*/statistics``. On a tap,
  ``rx`` is what the VM sent (QEMU wrote it into the tap), ``tx`` what was delivered to the VM;
- cap a tap's rate for real with ``tc``: a ``tbf`` on the tap's root qdisc shapes what goes to the VM,
  and its ingress (what the VM sends) is redirected (``u32`` + ``mirred``) to an ifb device whose root
  ``tbf`` shapes it. This kernel kind has no ``police`` action; the ifb works wherever ``tbf`` does;
- see the MACs a guest announces: the bridge's forwarding database (``/sys/class/net/BR/brforward``,
  learned entries of the tap's port), or the source MACs of its first frames (``AF_PACKET``);
- measure RTT for real with ICMP echo (:class:`RttProber`): a raw socket bound to the bridge sends
  echo requests to the VM's IPv4 address and times the replies (the bridge needs an address in the VM's
  subnet); and :class:`TapEndpoint`, the userspace end of a tap (what QEMU holds), for tests and the
  benchmark when no guest of ours sends.

It runs ``ip`` and ``tc`` (iproute2) as subprocesses and needs root (CAP_NET_ADMIN); every failure is a
:class:`~secmig.errors.HostNetError` naming the command. It knows nothing of VMs, rules or verdicts.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import json
import os
import shutil
import socket
import struct
import subprocess
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from secmig.errors import HostNetError

SYS_NET = Path("/sys/class/net")
IFNAMSIZ = 15
"""Longest interface name Linux accepts."""
_FDB_ENTRY = struct.Struct("=6sBBIBBH")
"""``struct __fdb_entry`` of ``brforward``: mac, port_no, is_local, ageing_timer, port_hi, pad, unused."""
_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_ETH_P_ALL = 0x0003
_PACKET_OUTGOING = 4


# --- commands ------------------------------------------------------------------------------------------


def missing_capability() -> str | None:
    """Why this process cannot make bridges and taps (None when it can): not root, or no iproute2."""
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN) to make bridges, taps and tc qdiscs"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"{tool} not found; install it with: apt-get install iproute2"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing"
    return None


def _run(*argv: str, check: bool = True) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10.0)
    except FileNotFoundError as err:
        raise HostNetError(f"{argv[0]} not found; install it with: apt-get install iproute2") from err
    except subprocess.TimeoutExpired as err:
        raise HostNetError(f"{' '.join(argv)}: no answer in 10 s") from err
    if check and out.returncode != 0:
        raise HostNetError(f"{' '.join(argv)}: {out.stderr.strip() or f'exit code {out.returncode}'}")
    return out.stdout


def _check_name(name: str) -> str:
    if not name or len(name) > IFNAMSIZ or "/" in name or any(c.isspace() for c in name):
        raise HostNetError(f"interface name {name!r}: 1 to {IFNAMSIZ} characters, no '/' or spaces")
    return name


def link_exists(name: str) -> bool:
    """Whether a network interface of that name exists in this namespace."""
    return (SYS_NET / name).exists()


def create_bridge(name: str) -> None:
    """Make a bridge (a vSwitch) and bring it up; an existing bridge of that name is kept."""
    _check_name(name)
    if not link_exists(name):
        _run("ip", "link", "add", name, "type", "bridge")
    elif not (SYS_NET / name / "bridge").is_dir():
        raise HostNetError(f"{name} exists and is not a bridge")
    _run("ip", "link", "set", name, "up")


def create_tap(name: str, bridge: str | None = None, *, mtu: int | None = None) -> None:
    """Make a persistent tap (QEMU opens it with ``-netdev tap,ifname=NAME,script=no``), attach it, up."""
    _check_name(name)
    if not link_exists(name):
        _run("ip", "tuntap", "add", "dev", name, "mode", "tap")
    if mtu is not None:
        _run("ip", "link", "set", name, "mtu", str(mtu))
    if bridge is not None:
        attach(name, bridge)
    _run("ip", "link", "set", name, "up")


def attach(port: str, bridge: str) -> None:
    """Make ``port`` (a tap, a veth) a port of ``bridge``."""
    _run("ip", "link", "set", _check_name(port), "master", _check_name(bridge))


def set_address(dev: str, cidr: str) -> None:
    """Give ``dev`` an IPv4/IPv6 address (``10.0.0.1/24``); the bridge needs one to probe RTT."""
    ipaddress.ip_interface(cidr)
    _run("ip", "addr", "replace", cidr, "dev", _check_name(dev))


def delete_link(name: str) -> None:
    """Remove an interface (tap, bridge, veth) and the ifb of its rate limit, if any; absent is fine."""
    for dev in (name, ifb_name(name)):
        if link_exists(dev):
            _run("ip", "link", "del", dev, check=False)


def bridge_ports(bridge: str) -> list[str]:
    """The ports of ``bridge`` (``/sys/class/net/BR/brif``)."""
    d = SYS_NET / bridge / "brif"
    if not d.is_dir():
        raise HostNetError(f"{bridge} is not a bridge")
    return sorted(p.name for p in d.iterdir())


def mac_of(dev: str) -> str:
    """The MAC address of an interface."""
    try:
        return (SYS_NET / dev / "address").read_text().strip().lower()
    except OSError as err:
        raise HostNetError(f"{dev}: no such interface") from err


# --- counters --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NicCounters:
    """An interface's counters at ``t_s`` (monotonic). On a tap, rx is from the VM, tx is to the VM."""

    t_s: float
    rx_bytes: int
    tx_bytes: int
    rx_packets: int
    tx_packets: int
    rx_dropped: int
    tx_dropped: int

    @property
    def bytes(self) -> int:
        """Both directions."""
        return self.rx_bytes + self.tx_bytes

    @property
    def packets(self) -> int:
        """Both directions."""
        return self.rx_packets + self.tx_packets


def _stat(dev: str, name: str) -> int:
    return int((SYS_NET / dev / "statistics" / name).read_text())


def read_counters(dev: str) -> NicCounters:
    """The counters of ``dev`` now; HostNetError when it is gone."""
    try:
        return NicCounters(
            time.monotonic(),
            _stat(dev, "rx_bytes"),
            _stat(dev, "tx_bytes"),
            _stat(dev, "rx_packets"),
            _stat(dev, "tx_packets"),
            _stat(dev, "rx_dropped"),
            _stat(dev, "tx_dropped"),
        )
    except (OSError, ValueError) as err:
        raise HostNetError(f"{dev}: cannot read its counters ({err})") from err


def read_bridge_counters(bridge: str) -> NicCounters:
    """The vSwitch's traffic: the sum over its ports (the bridge device itself counts only host-local frames)."""
    ports = [read_counters(p) for p in bridge_ports(bridge)]
    own = read_counters(bridge)
    return NicCounters(
        own.t_s,
        sum(p.rx_bytes for p in ports),
        sum(p.tx_bytes for p in ports),
        sum(p.rx_packets for p in ports),
        sum(p.tx_packets for p in ports),
        sum(p.rx_dropped for p in ports),
        sum(p.tx_dropped for p in ports),
    )


# --- rate limit (tc) -------------------------------------------------------------------------------------


def ifb_name(tap: str) -> str:
    """The ifb that shapes ``tap``'s ingress: a stable short name derived from the tap's."""
    return f"sif{zlib.crc32(tap.encode()) & 0xFFFFFFFF:08x}"


def _tbf(rate_bytes_per_s: float) -> list[str]:
    rate_bit = max(int(rate_bytes_per_s * 8), 8000)
    # A burst of 1/50 s of traffic (at least two full frames): smooth, and enough for the kernel's HZ.
    burst = max(int(rate_bytes_per_s / 50), 2 * 1536 + 64)
    return ["tbf", "rate", f"{rate_bit}bit", "burst", str(burst), "latency", "50ms"]


def limit_rate(tap: str, rate_bytes_per_s: float) -> None:
    """Cap ``tap`` at ``rate_bytes_per_s`` in each direction (to the VM and from it); replaces an earlier cap."""
    if rate_bytes_per_s <= 0:
        raise HostNetError(f"rate limit on {tap}: {rate_bytes_per_s} B/s is not positive")
    _check_name(tap)
    if not link_exists(tap):
        raise HostNetError(f"rate limit: no interface {tap}")
    tbf = _tbf(rate_bytes_per_s)
    _run("tc", "qdisc", "replace", "dev", tap, "root", "handle", "1:", *tbf)
    ifb = ifb_name(tap)
    if not link_exists(ifb):
        _run("ip", "link", "add", ifb, "type", "ifb")
    _run("ip", "link", "set", ifb, "up")
    _run("tc", "qdisc", "replace", "dev", ifb, "root", "handle", "1:", *tbf)
    if "ingress" not in _run("tc", "qdisc", "show", "dev", tap, "ingress"):
        _run("tc", "qdisc", "add", "dev", tap, "handle", "ffff:", "ingress")
        _run(
            "tc", "filter", "add", "dev", tap, "parent", "ffff:", "protocol", "all", "prio", "1",
            "u32", "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", ifb,
        )  # fmt: skip


def clear_rate_limit(tap: str) -> None:
    """Remove the cap of :func:`limit_rate` (both directions); nothing to remove is fine."""
    if link_exists(tap):
        _run("tc", "qdisc", "del", "dev", tap, "root", check=False)
        _run("tc", "qdisc", "del", "dev", tap, "ingress", check=False)
    ifb = ifb_name(tap)
    if link_exists(ifb):
        _run("ip", "link", "del", ifb, check=False)


def rate_limit_of(tap: str) -> float | None:
    """The cap on ``tap`` towards the VM (bytes/s) as tc reports it, None when uncapped."""
    out = _run("tc", "-j", "qdisc", "show", "dev", tap, "root", check=False)
    try:
        for q in json.loads(out or "[]"):
            if q.get("kind") == "tbf":
                return float(q["options"]["rate"])
    except (ValueError, KeyError, TypeError):
        return None
    return None


# --- MACs a guest announces ---------------------------------------------------------------------------


def _format_mac(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def port_number(port: str) -> int:
    """A bridge port's number (``brport/port_no``)."""
    try:
        return int((SYS_NET / port / "brport" / "port_no").read_text(), 0)
    except (OSError, ValueError) as err:
        raise HostNetError(f"{port} is not a bridge port") from err


def learned_macs(bridge: str, port: str) -> set[str]:
    """MACs the bridge learned from frames arriving on ``port`` (not its own, not static)."""
    want = port_number(port)
    try:
        raw = (SYS_NET / bridge / "brforward").read_bytes()
    except OSError as err:
        raise HostNetError(f"{bridge}: cannot read its forwarding database ({err})") from err
    macs: set[str] = set()
    for off in range(0, len(raw) - _FDB_ENTRY.size + 1, _FDB_ENTRY.size):
        mac, port_lo, is_local, _age, port_hi, _pad, _unused = _FDB_ENTRY.unpack_from(raw, off)
        if not is_local and (port_hi << 8 | port_lo) == want:
            macs.add(_format_mac(mac))
    return macs


def open_capture(dev: str) -> socket.socket:
    """A raw socket bound to ``dev``: frames count from this moment, so open it before what should be seen."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
    try:
        sock.bind((_check_name(dev), 0))
    except OSError as err:
        sock.close()
        raise HostNetError(f"capture on {dev}: {err.strerror or err}") from err
    return sock


def capture_source_macs(
    dev: str, timeout_s: float, *, max_frames: int = 64, sock: socket.socket | None = None
) -> list[str]:
    """Source MACs of the frames that arrive on ``dev`` from its far end (the VM, for a tap) within ``timeout_s``,
    in the order first seen; stops after ``max_frames`` frames. ``sock`` (from :func:`open_capture`, closed
    here) counts frames from when it was opened rather than from this call."""
    sock = sock if sock is not None else open_capture(dev)
    seen: list[str] = []
    try:
        deadline = time.monotonic() + timeout_s
        frames = 0  # only frames from the far end count: the host's own (IPv6 DAD, MLD…) are passed over
        while frames < max_frames:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            try:
                frame, addr = sock.recvfrom(2048)
            except TimeoutError:
                break
            if addr[2] == _PACKET_OUTGOING or len(frame) < 14:
                continue
            frames += 1
            mac = _format_mac(frame[6:12])
            if mac not in seen:
                seen.append(mac)
    except OSError as err:
        raise HostNetError(f"capture on {dev}: {err.strerror or err}") from err
    finally:
        sock.close()
    return seen


# --- RTT by ICMP echo --------------------------------------------------------------------------------------


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


class RttProber:
    """ICMP echo from this host to VMs' IPv4 addresses, over one raw socket (root), optionally bound to a bridge.

    ``await prober.rtt(ip, timeout_s)`` sends one echo request and returns the round trip in seconds, or
    None when no reply came in time. Many probes may be in flight at once; a reader callback on the event
    loop matches replies by identifier and sequence number.
    """

    def __init__(self, device: str | None = None) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        self._sock.setblocking(False)
        if device is not None:
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, _check_name(device).encode())
            except OSError as err:
                self._sock.close()
                raise HostNetError(f"RTT probe socket on {device}: {err.strerror or err}") from err
        self._ident = (os.getpid() ^ id(self)) & 0xFFFF
        self._seq = 0
        self._waiting: dict[tuple[str, int], tuple[float, asyncio.Future[float]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def close(self) -> None:
        """Stop reading and close the socket."""
        if self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._sock.fileno())
            self._loop = None
        for _t, fut in self._waiting.values():
            if not fut.done():
                fut.cancel()
        self._waiting.clear()
        self._sock.close()

    def _on_readable(self) -> None:
        while True:
            try:
                data, addr = self._sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            now = time.perf_counter()
            ihl = (data[0] & 0x0F) * 4 if data else 0
            if len(data) < ihl + 8 or data[ihl] != 0:  # type 0: echo reply
                continue
            ident, seq = struct.unpack_from("!HH", data, ihl + 4)
            if ident != self._ident:
                continue
            entry = self._waiting.pop((addr[0], seq), None)
            if entry is not None and not entry[1].done():
                entry[1].set_result(now - entry[0])

    async def rtt(self, ip: str, timeout_s: float = 0.5) -> float | None:
        """One echo request to ``ip``: the round trip in seconds, or None without a reply in ``timeout_s``."""
        loop = asyncio.get_running_loop()
        if self._loop is None:
            loop.add_reader(self._sock.fileno(), self._on_readable)
            self._loop = loop
        self._seq = (self._seq + 1) & 0xFFFF
        seq = self._seq
        header = struct.pack("!BBHHH", 8, 0, 0, self._ident, seq)
        payload = b"secmig-rtt-probe" + struct.pack("!d", time.time())
        packet = struct.pack("!BBHHH", 8, 0, _checksum(header + payload), self._ident, seq) + payload
        fut: asyncio.Future[float] = loop.create_future()
        key = (str(ipaddress.IPv4Address(ip)), seq)
        self._waiting[key] = (time.perf_counter(), fut)
        try:
            self._sock.sendto(packet, (key[0], 0))
        except OSError:
            self._waiting.pop(key, None)
            return None
        try:
            return await asyncio.wait_for(fut, timeout_s)
        except TimeoutError:
            return None
        finally:
            self._waiting.pop(key, None)


# --- the VM's end of a tap ----------------------------------------------------------------------------------


class TapEndpoint:
    """The userspace end of a tap (what QEMU holds): frames written here enter the host from the "VM".

    For tests and the benchmark: a stand-in VM NIC that sends frames at a set rate, when no guest of
    ours runs a network stack. Open an existing persistent tap (:func:`create_tap`).
    """

    def __init__(self, tap: str) -> None:
        self.tap = _check_name(tap)
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        except OSError as err:
            raise HostNetError(f"open /dev/net/tun: {err.strerror or err}") from err
        try:
            fcntl.ioctl(self.fd, _TUNSETIFF, struct.pack("16sH", tap.encode(), _IFF_TAP | _IFF_NO_PI))
        except OSError as err:
            os.close(self.fd)
            raise HostNetError(f"attach to tap {tap}: {err.strerror or err}") from err

    def close(self) -> None:
        """Let go of the tap (it stays, persistent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def send(self, frame: bytes) -> bool:
        """Write one Ethernet frame (no FCS); False when the kernel would block."""
        try:
            return os.write(self.fd, frame) == len(frame)
        except BlockingIOError:
            return False

    def drain(self) -> tuple[int, int]:
        """Read every frame waiting towards the VM: (frames, bytes)."""
        frames = nbytes = 0
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return frames, nbytes
            if not data:
                return frames, nbytes
            frames += 1
            nbytes += len(data)


def ethernet_frame(dst_mac: str, src_mac: str, size: int, ethertype: int = 0x88B5) -> bytes:
    """A frame of ``size`` bytes (header included, ≥ 60) of the local experimental EtherType 0x88B5."""
    if size < 60:
        raise ValueError(f"frame of {size} bytes: at least 60")
    dst = bytes.fromhex(dst_mac.replace(":", ""))
    src = bytes.fromhex(src_mac.replace(":", ""))
    return dst + src + struct.pack("!H", ethertype) + bytes(size - 14)
