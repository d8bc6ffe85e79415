"""What GET /health needs to know: tcpdump's version, and whether a capture can start at all.

A worker that cannot capture (no CAP_NET_RAW, a sandbox without AF_PACKET, no tcpdump) must
not answer "ok": load balancers and the README's install check read /health. So it runs what a
capture runs, `tcpdump -i any -d` (which opens the capture device on `any` to learn its link
type, then prints a program and exits), as a capture's tcpdump would run: same binary, same
user, same capabilities. A success is kept a while (CHECK_KEEP_OK_S: nothing in the worker can
lose a capability, but a new tcpdump binary may be installed), a failure only briefly, and
concurrent requests share one run.
"""

from __future__ import annotations

import asyncio
import subprocess
import time

from ddump.worker.capture import CaptureRefused
from ddump.worker.spawn import child_setup
from ddump.worker.start import missing_tcpdump_message
from ddump.worker.state import WorkerState
from ddump.worker.tcpdump import classify_start_failure, error_lines

VERSION_TIMEOUT_S = 5
CHECK_TIMEOUT_S = 5
CHECK_KEEP_OK_S = 30.0
CHECK_KEEP_FAILED_S = 2.0


async def capture_check(state: WorkerState) -> str | None:
    """None when tcpdump can open a capture on `any`, else why it cannot and what to do."""
    if state.capture_checked is not None:
        at, answer = state.capture_checked
        keep = CHECK_KEEP_OK_S if answer is None else CHECK_KEEP_FAILED_S
        if time.monotonic() - at < keep:
            return answer
    if state.capture_probe is None or state.capture_probe.done():
        state.capture_probe = asyncio.ensure_future(_check_and_keep(state))
    return await asyncio.shield(state.capture_probe)


def capture_started(state: WorkerState) -> None:
    """A capture just started: that answers the check too."""
    state.capture_checked = (time.monotonic(), None)


async def _check_and_keep(state: WorkerState) -> str | None:
    answer = await _probe_capture(state)
    state.capture_checked = (time.monotonic(), answer)
    return answer


async def _probe_capture(state: WorkerState) -> str | None:
    try:
        process = await asyncio.create_subprocess_exec(
            state.tcpdump,
            "-i",
            "any",
            "-d",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=child_setup(state.drop_to),
        )
    except FileNotFoundError:
        return missing_tcpdump_message(state.tcpdump)
    except (OSError, subprocess.SubprocessError) as error:
        return f"cannot run {state.tcpdump!r}: {error}"
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), CHECK_TIMEOUT_S)
    except asyncio.CancelledError:  # the worker stops: never leave it behind
        process.kill()
        raise
    except TimeoutError:
        process.kill()
        await process.wait()
        return f"{state.tcpdump} -i any -d did not answer within {CHECK_TIMEOUT_S} s"
    if process.returncode == 0:
        return None
    text = stderr.decode("utf-8", "replace")
    failure = classify_start_failure(text, process.returncode)
    if failure.status == 503:
        return failure.message
    said = error_lines(text).replace("\n", "; ") or f"exit status {process.returncode}"
    return f"{state.tcpdump} cannot open a capture on any: {said}"


async def tcpdump_version(state: WorkerState) -> dict[str, str]:
    """`tcpdump --version`, cached once it answered: {"tcpdump": ..., "libpcap": ...}.

    Concurrent /health requests share one run.
    """
    if state.version:
        return state.version
    if state.version_probe is None or state.version_probe.done():
        state.version_probe = asyncio.ensure_future(_probe_version(state))
    return await asyncio.shield(state.version_probe)


async def _probe_version(state: WorkerState) -> dict[str, str]:
    try:
        process = await asyncio.create_subprocess_exec(
            state.tcpdump,
            "--version",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
    except FileNotFoundError:
        raise CaptureRefused(503, missing_tcpdump_message(state.tcpdump)) from None
    except OSError as error:
        raise CaptureRefused(503, f"cannot run {state.tcpdump!r} --version: {error}") from None
    try:
        output, _ = await asyncio.wait_for(process.communicate(), VERSION_TIMEOUT_S)
    except asyncio.CancelledError:  # the worker stops: never leave it behind either
        process.kill()
        raise
    except TimeoutError:
        process.kill()  # never leave it behind: it has no parent-death signal
        await process.wait()
        raise CaptureRefused(
            503, f"{state.tcpdump} --version did not answer within {VERSION_TIMEOUT_S} s"
        ) from None
    lines = output.decode("utf-8", "replace").splitlines()
    if process.returncode != 0 or not lines:
        raise CaptureRefused(503, f"{state.tcpdump} --version failed: {' '.join(lines)}")
    state.version["tcpdump"] = lines[0]
    for line in lines[1:]:
        if line.startswith("libpcap"):
            state.version["libpcap"] = line
    return state.version
