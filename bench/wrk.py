"""A load generator in C for the flat-out ingress figures: wrk (Debian's package), replaying
pre-signed webhooks.

The Python load generator in the bench process costs ~100-130 us of CPU per webhook, about as much
as the API itself, on the same two cores: flat out, it measured the client as much as the API.
wrk costs a few us per request. The requests are built and signed here (distinct ids, valid
signatures, a timestamp within the tolerance) and written as a Lua table that a small script
cycles through; the API does the same work per request as for any other webhook (it keeps no
replay cache: duplicates are the worker's ledger's business, and no worker runs in this phase).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

_SCRIPT = """
local requests = dofile(os.getenv("PARLEY_WRK_REQUESTS"))
local i = 0
request = function()
  i = i % #requests + 1
  return requests[i]
end
"""


def available() -> bool:
    """Is wrk installed (`make bench` installs it)?"""
    return shutil.which("wrk") is not None


def _lua_string(raw: str) -> str:
    escaped = raw.replace("\\", "\\\\").replace('"', '\\"').replace("\r", "\\r").replace("\n", "\\n")
    return f'"{escaped}"'


def _http(host: str, path: str, body: bytes, headers: dict[str, str]) -> str:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items() if k.lower() not in ("host", "content-length")]
    return "\r\n".join(lines) + "\r\n\r\n" + body.decode()


@dataclass
class Result:
    rate: float  # requests/s answered 2xx
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: int  # non-2xx answers and socket errors


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


def parse(out: str) -> Result:
    """wrk --latency's report."""
    total = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lat = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", out, re.M))
    max_m = re.search(r"Latency\s+\S+\s+\S+\s+([\d.]+)(us|ms|s|m)\b", out)

    def value(text: str) -> float:
        m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
        return _ms(m.group(1), m.group(2)) if m else float("nan")

    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(bad.group(1)) if bad else 0) + (sum(int(g) for g in sock.groups()) if sock else 0)
    requests = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    seconds = _ms(requests.group(2), requests.group(3)) / 1000 if requests else 0.0
    good = total - (errors / seconds if seconds else 0.0)
    max_ms = _ms(max_m.group(1), max_m.group(2)) if max_m else float("nan")
    return Result(good, value(lat.get("50", "")), value(lat.get("99", "")), max_ms, errors)


async def flat_out(
    base_url: str,
    path: str,
    requests: list[tuple[bytes, dict[str, str]]],
    *,
    seconds: float = 10.0,
    connections: int = 64,
    threads: int = 1,
) -> Result:
    """Replay the signed requests (cycled) flat out for `seconds`; wrk's own figures."""
    host = base_url.split("://", 1)[1]
    with tempfile.TemporaryDirectory(prefix="parley-wrk-") as tmp:
        table = Path(tmp) / "requests.lua"
        table.write_text(
            "return {\n" + ",\n".join(_lua_string(_http(host, path, b, h)) for b, h in requests) + "\n}\n"
        )
        script = Path(tmp) / "replay.lua"
        script.write_text(_SCRIPT)
        proc = await asyncio.create_subprocess_exec(
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{round(seconds)}s",
            "--latency",
            "-s",
            str(script),
            base_url + path,
            env={"PARLEY_WRK_REQUESTS": str(table)},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"wrk failed ({proc.returncode}): {out.decode(errors='replace')[-2000:]}")
        return parse(out.decode())
