"""The README's Wireshark screenshot, taken of the real GUI: `make screenshot` (root).

Two hosts in network namespaces (tests/netns.py) each run a worker; Wireshark, under Xvfb with a
HOME of its own where `ddump-extcap --install` put the extcap, is started on the ddump interface
with an inventory group of both hosts, while the hosts ping and send UDP to each other. The
picture is the interface list (ddump in it) with ddump's options dialog open on the inventory
(its groups read), above the live capture, whose Interface column (frame.interface_name) names
each packet's host. Then it presses Stop (Ctrl+E) and checks that the extcap ended and that
every worker saw its client go: Wireshark's own stop path, which tshark's tests cannot take.

Needs: wireshark (wireshark-qt), xvfb (Xvfb), x11-apps (xwd), xdotool, imagemagick (convert).
Usage: python -m tests.wireshark_screenshot [OUT.png]     (default docs/wireshark-ddump.png)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from tests.netns import Fleet, WorkerProcess, icmp_traffic, udp_traffic, worker_argv

PORT = 8475
SIZE = (1280, 720)
LIST_HEIGHT = 480  # of the first picture: the interface list and ddump's options dialog
DISPLAY = ":73"
NEEDS = {"wireshark": "wireshark", "Xvfb": "xvfb", "xwd": "x11-apps", "xdotool": "xdotool",
         "convert": "imagemagick"}  # fmt: skip
# ImageMagick's own, where a different `convert` comes first on PATH.
CONVERT = "/usr/bin/convert" if os.path.exists("/usr/bin/convert") else "convert"
GEAR = ("169", "238")  # ddump's gear icon, the first row of the welcome page's list
RELOAD = (447, 92)  # "Read the inventory's groups", from the options dialog's corner

PREFERENCES = """\
gui.column.format:
\t"No.", "%m",
\t"Time", "%Rt",
\t"Interface", "%Cus:frame.interface_name:0:R",
\t"Source", "%s",
\t"Destination", "%d",
\t"Protocol", "%p",
\t"Length", "%L",
\t"Info", "%i"
capture.devices_hide: {hidden}
gui.interfaces_hidden_types: 0,9
gui.update.enabled: FALSE
"""

RECENT = f"""\
gui.geometry_main_x: 0
gui.geometry_main_y: 0
gui.geometry_main_width: {SIZE[0]}
gui.geometry_main_height: {SIZE[1]}
gui.geometry_main_maximized: TRUE
privs.warn_if_elevated: FALSE
privs.warn_if_no_npf: FALSE
"""

# Packet list column widths in pixels (Wireshark's "recent" file), by column format.
COLUMN_WIDTHS = """\
column.width: %m, 50, %Rt, 110, %Cus:frame.interface_name, 120, %s, 110, %d, 110, %p, 70, \
%L, 60, %i, 400
"""


def _say(text: str) -> None:
    print(f"screenshot: {text}", file=sys.stderr, flush=True)


def _home(root: Path) -> dict[str, str]:
    """A HOME with the extcap installed and Wireshark set up; the environment to run it in."""
    home = root / "home"
    config = home / ".config" / "wireshark"
    config.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    env |= {"HOME": str(home), "DISPLAY": DISPLAY, "QT_QPA_PLATFORM": "xcb", "LC_ALL": "C.UTF-8"}
    subprocess.run(
        [sys.executable, "-m", "ddump.extcap", "--install"], env=env, check=True, timeout=60,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    # Only ddump (and the loopback) in the interface list: the machine's other interfaces (test
    # fleets' veths, which come and go: hidden by type too; other extcaps) would push ddump
    # out of the picture.
    listed = subprocess.run(
        ["tshark", "-D"], env=env, capture_output=True, text=True, timeout=120, check=True
    ).stdout
    names = {line.split()[1] for line in listed.splitlines() if len(line.split()) > 1}
    hidden = ",".join(sorted(names - {"lo", "ddump"}))
    (config / "preferences").write_text(PREFERENCES.format(hidden=hidden))
    (config / "recent_common").write_text(RECENT)
    (config / "recent").write_text(COLUMN_WIDTHS)
    return env


@contextlib.contextmanager
def _running(argv: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


def _snap(env: dict[str, str], out: Path) -> None:
    xwd = subprocess.run(
        ["xwd", "-root", "-silent", "-display", DISPLAY], capture_output=True, check=True,
        timeout=30,
    )  # fmt: skip
    subprocess.run(
        [CONVERT, "xwd:-", f"png:{out}"], input=xwd.stdout, check=True, timeout=60, env=env
    )


def _window_shown(env: dict[str, str], timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = subprocess.run(
            ["xwininfo", "-root", "-tree", "-display", DISPLAY],
            capture_output=True, text=True, env=env, check=False,
        )  # fmt: skip
        if "Wireshark" in found.stdout:
            _fill_screen(env)
            return
        time.sleep(0.5)
    raise RuntimeError("no Wireshark window appeared")


def _fill_screen(env: dict[str, str]) -> None:
    """No window manager: place and size the main window ourselves."""
    subprocess.run(
        ["xdotool", "search", "--onlyvisible", "--class", "wireshark",
         "windowmove", "%@", "0", "0", "windowsize", "%@", str(SIZE[0]), str(SIZE[1])],
        env=env, capture_output=True, timeout=30, check=False,
    )  # fmt: skip


def _window_geometry(env: dict[str, str], title: str) -> tuple[int, int] | None:
    """The top-left corner of the window whose title holds `title`, if one is shown."""
    tree = subprocess.run(
        ["xwininfo", "-root", "-tree", "-display", DISPLAY],
        capture_output=True, text=True, env=env, check=False,
    ).stdout  # fmt: skip
    for line in tree.splitlines():
        if title in line:
            corner = line.split()[-1]  # +X+Y, absolute
            x, y = corner.lstrip("+").split("+")
            return int(x), int(y)
    return None


def _open_options(env: dict[str, str]) -> bool:
    """Open ddump's options from its gear icon and read the inventory's groups; True if shown.

    Clicks where Wireshark 4.0 draws them at this size; another layout leaves the dialog out.
    """
    subprocess.run(["xdotool", "mousemove", *GEAR, "click", "1"], env=env, check=False)
    time.sleep(4)
    corner = _window_geometry(env, "Interface Options")
    if corner is None:
        return False
    x, y = (corner[0] + RELOAD[0], corner[1] + RELOAD[1])
    subprocess.run(["xdotool", "mousemove", str(x), str(y), "click", "1"], env=env, check=False)
    time.sleep(4)
    return True


def _stop_from_the_gui(env: dict[str, str], workers: list[WorkerProcess]) -> None:
    """Capture → Stop (Ctrl+E), as a user would: every worker must see its client go."""
    subprocess.run(
        ["xdotool", "search", "--onlyvisible", "--class", "wireshark", "windowfocus", "--sync",
         "%1", "key", "ctrl+e"],
        env=env, capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    for worker in workers:
        line = worker.wait_log(" end:", 15)
        if "client closed" not in line:
            raise RuntimeError(f"the capture did not end as a stop: {line}")
    end = time.monotonic() + 10
    while _extcap_running():
        if time.monotonic() > end:
            raise RuntimeError("ddump-extcap still runs 10 s after Stop")
        time.sleep(0.1)
    _say("Stop in Wireshark ended ddump-extcap and the capture on every worker")


def _extcap_running() -> bool:
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if b"--capture" in argv and any(a.endswith(b"/extcap/ddump") for a in argv):
                return True
    return False


def take(out: Path) -> None:
    missing = [package for tool, package in NEEDS.items() if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"screenshot: install {' '.join(missing)} first (apt-get install)")
    with tempfile.TemporaryDirectory(prefix="ddump-shot-") as tmp, Fleet(2) as fleet:
        root = Path(tmp)
        env = _home(root)
        h1, h2 = fleet.hosts
        inventory = root / "fleet.yaml"
        inventory.write_text(
            f"defaults:\n  port: {PORT}\ngroups:\n  pair:\n"
            f"    - {{name: web-1, host: {h1.address}}}\n"
            f"    - {{name: db-1, host: {h2.address}}}\n"
        )
        workers = [WorkerProcess(worker_argv("--listen", f":{PORT}"), h) for h in fleet.hosts]
        screen = f"{SIZE[0]}x{SIZE[1]}x24"
        with contextlib.ExitStack() as stack:
            for worker in workers:
                stack.enter_context(worker)
                worker.wait_listening()
            stack.enter_context(_running(["Xvfb", DISPLAY, "-screen", "0", screen], env))
            time.sleep(1)
            list_png, capture_png = root / "list.png", root / "capture.png"
            _say("the interface list")
            inventory_pref = f"extcap.ddump.inventory:{inventory}"
            with _running(["wireshark", "-o", inventory_pref], env):
                _window_shown(env)
                time.sleep(15)  # the welcome page finds the interfaces (the extcaps: slow)
                _fill_screen(env)
                time.sleep(1)
                if not _open_options(env):
                    _say("no options dialog at the expected place: the list alone")
                _snap(env, list_png)
            _say("a live capture of both hosts")
            wireshark = [
                "wireshark", "-i", "ddump", "-k", "-f", "icmp or udp port 5000",
                "-o", f"extcap.ddump.inventory:{inventory}", "-o", "extcap.ddump.group:pair",
            ]  # fmt: skip
            with _running(wireshark, env):
                _window_shown(env)
                for worker in workers:
                    worker.wait_log(" start:", 60)
                time.sleep(0.5)
                pings = threading.Thread(
                    target=icmp_traffic, args=(h1, h2), kwargs={"count": 12, "rate": 4}
                )
                pings.start()
                udp_traffic(h2, h1, port=5000, count=12, rate=4, size=120)
                pings.join()
                time.sleep(2)
                _fill_screen(env)
                time.sleep(1)
                _snap(env, capture_png)
                _stop_from_the_gui(env, workers)
        subprocess.run(
            [CONVERT, str(list_png), "-crop", f"{SIZE[0]}x{LIST_HEIGHT}+0+0", "+repage",
             str(capture_png), "-append", str(out)],
            check=True, timeout=60,
        )  # fmt: skip
    _say(f"wrote {out}")


if __name__ == "__main__":
    take(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/wireshark-ddump.png"))
