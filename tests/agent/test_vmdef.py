"""VM definitions: a user's YAML validated like scenarios, one line naming file, field and value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from secmig.agent.manifest import Manifest
from secmig.agent.vmdef import definition_from_json, load_definition, reference_definition
from secmig.agent.vocab import DataPlane, DriverKind
from secmig.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "vm" / "linux-guest.yaml"

GOOD = """
name: web1
memory: 256MiB
vcpus: 2
accel: tcg
boot:
  kernel: /boot/vmlinuz
  initrd: /boot/initrd.img
  append: console=ttyS0
disks:
  - path: /srv/shared/web1.qcow2
    format: qcow2
nics:
  - mac: 52-54-00-AA-BB-CC
    bridge: br0
    rate: 1MB/s
extra_args: [-rtc, base=utc]
"""


def _write(tmp_path: Path, text: str, name: str = "web1.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_a_full_definition_reads_and_round_trips(tmp_path: Path) -> None:
    """Every field is read (units, MAC normalised) and the JSON form reads back as the same definition."""
    d = load_definition(_write(tmp_path, GOOD))
    assert d.memory == 256 << 20 and d.vcpus == 2 and d.nics[0].mac == "52:54:00:aa:bb:cc"
    assert d.nics[0].rate == 1e6 and d.disks[0].format == "qcow2" and d.extra_args == ("-rtc", "base=utc")
    assert definition_from_json(d.to_json()) == d and not d.builtin and d.mac == "52:54:00:aa:bb:cc"
    assert len(d.tap_name("hv-a", 0)) <= 15 and d.tap_name("hv-a", 0) != d.tap_name("hv-b", 0)


@pytest.mark.parametrize(
    ("field", "bad", "needle"),
    [
        ("memory: 256MiB", "memory: 12 parsecs", 'web1.yaml: memory: "12 parsecs" is not a size'),
        ("mac: 52-54-00-AA-BB-CC", "mac: 52:54:zz", "web1.yaml: nics[0].mac: MAC address '52:54:zz'"),
        ("vcpus: 2", "vcpus: 0", "web1.yaml: vcpus: 0"),
        ("format: qcow2", "format: vmdk", "web1.yaml: disks[0].format: 'vmdk'"),
        ("accel: tcg", "accel: hyperv", "web1.yaml: accel: 'hyperv'"),
        ("vcpus: 2", "vcpu: 2", "web1.yaml: vcpu: unknown field"),
        ("extra_args: [-rtc, base=utc]", "extra_args: [-incoming, defer]", "web1.yaml: extra_args: "),
    ],
)
def test_a_bad_field_is_one_line_naming_file_field_and_value(tmp_path: Path, field: str, bad: str, needle: str) -> None:
    """A mistake is one ConfigError line that names the file, the field and the value."""
    with pytest.raises(ConfigError) as info:
        load_definition(_write(tmp_path, GOOD.replace(field, bad)))
    msg = str(info.value)
    assert msg.startswith(needle) and "\n" not in msg


def test_cli_define_with_a_bad_field_exits_2(tmp_path: Path) -> None:
    """``secmig vm define`` on a bad definition: exit 2 and one line on stderr, before any agent is asked."""
    path = _write(tmp_path, GOOD.replace("memory: 256MiB", "memory: lots"))
    out = subprocess.run(
        [sys.executable, "-m", "secmig", "vm", "define", str(path), "--socket", str(tmp_path / "none.sock")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    lines = [ln for ln in out.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "web1.yaml" in lines[0] and "memory" in lines[0] and "lots" in lines[0]


def test_missing_files_are_named(tmp_path: Path) -> None:
    """A kernel that is not on this host is named with its field."""
    d = load_definition(_write(tmp_path, GOOD))
    with pytest.raises(ConfigError, match=r"boot.kernel: '/boot/vmlinuz' is not a file"):
        d.check_files("web1.yaml")


def test_example_file_is_valid() -> None:
    """The README's example definition validates."""
    d = load_definition(EXAMPLE)
    assert d.nics and d.nics[0].bridge and d.boot.kernel is not None


def test_manifest_digest_covers_the_definition() -> None:
    """Changing any field of the definition changes the manifest digest a grant binds."""
    d = reference_definition("q1", {"ram_bytes": 64 << 20, "working_set_bytes": 8 << 20})
    m1 = Manifest(DriverKind.QEMU, DataPlane.RELAY, {"definition": d.to_json()})
    m2 = Manifest(DriverKind.QEMU, DataPlane.RELAY, {"definition": {**d.to_json(), "extra_args": ["-x"]}})
    assert m1.digest() != m2.digest() and m1.digest() == Manifest.decode(m1.encode(4096)).digest()
    assert not m1.needs_bound_grant and m2.needs_bound_grant
