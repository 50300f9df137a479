"""``secmig guest``: build the Linux guest from Debian's packages, and boot it once to see it work."""

from __future__ import annotations

import asyncio
import socket
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from secmig.agent.qemu.linuxguest import (
    KERNEL_PACKAGE,
    USER_NET_GUEST_IP,
    USER_NET_HOST_IP,
    GuestImage,
    GuestNic,
    LinuxGuestParams,
    boot_linux_guest,
    build_linux_guest,
    count_udp_arrivals,
    measure_dirty_rate,
)
from secmig.agent.qemu.machine import AccelChoice, choose_accel, find_qemu
from secmig.cli import app, console, option_value
from secmig.errors import ConfigError
from secmig.model.units import format_bytes, parse_size

guest_app = typer.Typer(help="The Linux guest (Debian kernel + busybox initramfs + a workload at set rates).")
app.add_typer(guest_app, name="guest")


def _image(cache_dir: Path | None, kernel_package: str) -> GuestImage:
    return build_linux_guest(cache_dir=cache_dir / "linux-guest" if cache_dir else None, kernel_package=kernel_package)


CacheOpt = Annotated[
    Path | None, typer.Option(help="Cache root (default $SECMIG_CACHE, else ~/.cache/secmig).", show_default=False)
]
PackageOpt = Annotated[str, typer.Option(help="Debian kernel package to build from.")]


@guest_app.command("build")
def build(cache_dir: CacheOpt = None, kernel_package: PackageOpt = KERNEL_PACKAGE) -> None:
    """Fetch the packages, build the image (once; later calls only find it) and print where it is."""
    image = _image(cache_dir, kernel_package)
    console.print(f"kernel   {image.kernel}  ({format_bytes(image.kernel.stat().st_size)})", highlight=False)
    console.print(f"initrd   {image.initrd}  ({format_bytes(image.initrd.stat().st_size)})", highlight=False)
    console.print(f"from     {image.kernel_package} {image.kernel_version}, busybox-static {image.busybox_version}",
                  highlight=False)  # fmt: skip
    console.print(f"modules  {' '.join(image.modules)}", highlight=False)
    console.print(f"append   {image.append}", highlight=False)


@guest_app.command("run")
def run(
    seconds: Annotated[float, typer.Option(help="How long to watch the running guest.")] = 3.0,
    dirty: Annotated[int, typer.Option(help="Pages the guest writes per second (0 = none).")] = 5000,
    working_set: Annotated[str, typer.Option(help="Memory the guest keeps dirtying, e.g. 64MiB.")] = "64MiB",
    udp_rate: Annotated[int, typer.Option(help="UDP payload bytes per second the guest sends to the host.")] = 100_000,
    ram: Annotated[str, typer.Option(help="Guest RAM, e.g. 256MiB.")] = "256MiB",
    accel: Annotated[str, typer.Option(help="auto|kvm|tcg.")] = "auto",
    cache_dir: CacheOpt = None,
    kernel_package: PackageOpt = KERNEL_PACKAGE,
) -> None:
    """Boot the guest on QEMU's user-mode network, then measure its dirty rate and UDP traffic."""
    if seconds < 2:
        raise ConfigError(f"--seconds: {seconds} is under 2 (QEMU measures the dirty rate over whole seconds)")
    if accel not in ("auto", "kvm", "tcg"):
        raise ConfigError(f"--accel: {accel!r} is not auto, kvm or tcg")
    choice: AccelChoice = "kvm" if accel == "kvm" else "tcg" if accel == "tcg" else "auto"
    image = _image(cache_dir, kernel_package)
    ws = option_value("--working-set", parse_size, working_set)
    ram_bytes = option_value("--ram", parse_size, ram)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock, tempfile.TemporaryDirectory(prefix="secmig-guest-") as workdir:
        sock.bind(("127.0.0.1", 0))
        params = LinuxGuestParams(
            working_set_bytes=ws, dirty_pages_per_s=dirty, ip=USER_NET_GUEST_IP,
            gateway=USER_NET_HOST_IP, udp_dest=(USER_NET_HOST_IP, sock.getsockname()[1]),
            udp_rate_bytes_per_s=udp_rate,
        )  # fmt: skip
        config = image.machine_config(
            params, ram_bytes=ram_bytes, accel=choose_accel(choice), qemu_binary=find_qemu(),
            nics=(GuestNic(),),
        )  # fmt: skip

        async def go() -> None:
            async with boot_linux_guest("linux-guest", config, Path(workdir)) as (vm, ready):
                console.print(f"ready in {ready.ready_after_s:.1f} s ({config.accel}): ip={ready.ip} mac={ready.mac}",
                              highlight=False)  # fmt: skip
                rate, udp = await asyncio.gather(
                    measure_dirty_rate(vm, max(int(seconds), 1)), count_udp_arrivals(sock, seconds)
                )
                console.print(f"dirty rate  {rate:,.0f} pages/s measured by QEMU (set {dirty:,})", highlight=False)
                console.print(
                    f"UDP         {udp.rate_bytes_per_s:,.0f} bytes/s arrived, {udp.datagrams} datagrams, "
                    f"{udp.lost} lost (set {udp_rate:,})",
                    highlight=False,
                )

        asyncio.run(go())
