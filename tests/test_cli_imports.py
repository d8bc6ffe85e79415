"""Start-up cost: merging capture files loads nothing that only network targets need."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ddump.pcap import MAGIC_NANO
from tests.fake_worker import pcap_stream, sll2_packet

REPO = Path(__file__).resolve().parents[1]

# Loaded only for worker URLs (HTTP client, TLS trust roots) or -f inventories. `ssl` is not
# here: asyncio imports it whatever ddump does.
NETWORK_ONLY = (
    "tornado",
    "certifi",
    "yaml",
    "ddump.cli.stream",
    "ddump.cli.chunked",
    "ddump.inventory",
)

# Runs in a fresh interpreter, then prints on stderr which of NETWORK_ONLY got loaded.
REPORT_LOADED = """
import json, sys
names = sys.argv[1].split(",")
loaded = [n for n in names if any(m == n or m.startswith(n + ".") for m in sys.modules)]
print(json.dumps(loaded), file=sys.stderr)
"""


def loaded_after(code: str, *args: str) -> tuple[list[str], bytes]:
    """Run `code` in a fresh interpreter: the NETWORK_ONLY modules it loaded, and its stdout."""
    proc = subprocess.run(
        [sys.executable, "-c", code + REPORT_LOADED, ",".join(NETWORK_ONLY), *args],
        capture_output=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    loaded: list[str] = json.loads(proc.stderr.decode().splitlines()[-1])
    return loaded, proc.stdout


def test_importing_the_cli_loads_no_network_module() -> None:
    loaded, _ = loaded_after("import ddump.cli.main")

    assert loaded == []


def test_merging_a_capture_file_to_stdout_loads_no_network_module(tmp_path: Path) -> None:
    capture = tmp_path / "a.pcap"
    capture.write_bytes(
        pcap_stream([(1_700_000_000 * 10**9 + i, sll2_packet(b"x")) for i in (1, 2)])
    )
    run_ddump = "import sys\nfrom ddump.cli.main import main\nassert main(sys.argv[2:]) == 0\n"

    loaded, pcap = loaded_after(run_ddump, "-q", str(capture), "-w", "-")

    assert pcap[:4] == MAGIC_NANO.to_bytes(4, "little")
    assert len(pcap) == len(capture.read_bytes())  # the same header and two records
    assert loaded == []
