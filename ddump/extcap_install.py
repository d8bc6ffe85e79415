"""`ddump-extcap --install`: put ddump in the user's personal extcap folder.

Wireshark looks for personal extcaps in a folder that moved in 4.2 (its release notes):
  4.0, 4.1:  <personal configuration>/extcap, i.e. $XDG_CONFIG_HOME/wireshark/extcap
             (~/.config/wireshark/extcap), or ~/.wireshark/extcap where that older folder exists
  4.2 on:    $HOME/.local/lib/wireshark/extcap
The installed Wireshark says which one it is: `tshark -G folders` names its personal
configuration folder (and, from 4.2, its personal extcap folder) and `tshark --version` its
version. Without tshark, both folders are used, so that either Wireshark finds it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from ddump.errors import DdumpError

LAUNCHER_NAME = "ddump"
NEW_LAYOUT = (4, 2)  # the first Wireshark whose personal extcap folder is under ~/.local/lib


def home() -> str:
    return os.environ.get("HOME") or os.path.expanduser("~")


def new_folder() -> str:
    return os.path.join(home(), ".local", "lib", "wireshark", "extcap")


def old_folder() -> str:
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(home(), ".config")
    legacy = os.path.join(home(), ".wireshark")
    base = legacy if os.path.isdir(legacy) else os.path.join(config, "wireshark")
    return os.path.join(base, "extcap")


def _tshark(*args: str) -> str | None:
    tshark = shutil.which("tshark")
    if tshark is None:
        return None
    try:
        done = subprocess.run(
            [tshark, *args], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def parse_version(text: str) -> tuple[int, int] | None:
    """(major, minor) from `tshark --version`'s first line."""
    match = re.search(r"\(Wireshark\) (\d+)\.(\d+)", text) or re.search(r" (\d+)\.(\d+)\.", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def parse_folders(text: str) -> dict[str, str]:
    """`tshark -G folders` as {label: path}."""
    folders: dict[str, str] = {}
    for line in text.splitlines():
        label, colon, path = line.partition(":")
        if colon and path.strip():
            folders.setdefault(label.strip(), path.strip())
    return folders


def personal_folders() -> list[str]:
    """Where this user's Wireshark looks for personal extcaps (both layouts when unknown)."""
    folders = parse_folders(_tshark("-G", "folders") or "")
    if "Personal Extcap path" in folders:
        return [folders["Personal Extcap path"]]
    version = parse_version(_tshark("--version") or "")
    if version is None:
        return [new_folder(), old_folder()]
    if version >= NEW_LAYOUT:
        return [new_folder()]
    if "Personal configuration" in folders:
        return [os.path.join(folders["Personal configuration"], "extcap")]
    return [old_folder()]


def launcher_text(python: str) -> str:
    """A script that runs this ddump's extcap with this Python (its virtualenv, if any)."""
    return (
        f"#!{python}\n"
        "# Wireshark's ddump capture interface, written by `ddump-extcap --install`.\n"
        "import sys\n\n"
        "from ddump.extcap import main\n\n"
        "sys.exit(main())\n"
    )


def install(folders: list[str] | None = None) -> list[str]:
    """Write the launcher into each folder; return the paths written."""
    written = []
    for folder in folders or personal_folders():
        path = os.path.join(folder, LAUNCHER_NAME)
        try:
            os.makedirs(folder, exist_ok=True)
            temporary = path + ".new"
            with open(temporary, "w", encoding="utf-8") as file:
                file.write(launcher_text(sys.executable))
            os.chmod(temporary, 0o755)
            os.replace(temporary, path)
        except OSError as exc:
            raise DdumpError(f"cannot install the extcap in {folder}: {exc.strerror}") from None
        written.append(path)
    return written
