"""Small filesystems a test mounts (as root, where mount(8) works): full disks and read-only folders for real."""

from __future__ import annotations

import subprocess
from pathlib import Path


def mount_tmpfs(folder: Path, size: str) -> bool:
    """A tmpfs of `size` at `folder`; False where this machine cannot mount (not root, no CAP_SYS_ADMIN)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True).returncode == 0
    except FileNotFoundError:  # no mount(8) here
        return False


def remount(folder: Path, mode: str) -> None:
    """`mode` "ro" or "rw": read-only binds root too, where permissions do not."""
    subprocess.run(["mount", "-o", f"remount,{mode}", str(folder)], check=True, capture_output=True)


def umount(folder: Path) -> None:
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)
