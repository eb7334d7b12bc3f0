"""Run an Argo CD health check (a Lua chunk that reads the global ``obj`` and returns {status, message}) with the
real Lua 5.1 interpreter, as Argo CD's gopher-lua would: the object becomes a Lua table, and the chunk sees only
the base, string and table libraries, so a script that needs io, os or a newer Lua fails here too."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path
from typing import Any

from kiln.testing.tools import tool_path

# The globals a health check may use; anything else (io, os, require, math, ...) is nil inside the sandbox.
SANDBOX = ("ipairs", "pairs", "next", "tostring", "tonumber", "type", "select", "unpack", "error", "pcall", "string",
           "table")  # fmt: skip

HARNESS = """
local script = arg[1]
local sandbox = {%(sandbox)s}
local objects = {%(objects)s}
for _, object in ipairs(objects) do
  local chunk = assert(loadfile(script))
  local env = {obj = object}
  for _, name in ipairs(sandbox) do env[name] = _G[name] end
  setfenv(chunk, env)
  local health = chunk()
  assert(type(health) == "table", "the script must return a table")
  assert(type(health.status) == "string" and type(health.message) == "string", "status and message must be strings")
  io.write(#health.status, ":", health.status, #health.message, ":", health.message)
end
"""


def lua_literal(value: Any) -> str:
    """A Lua expression for a JSON-shaped value (Argo CD converts the object's JSON to Lua tables the same way)."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{value!r}: not a JSON number")
        return repr(value)
    if isinstance(value, str):
        # Every byte outside printable ASCII (and the quote and backslash) as a decimal escape: exact in Lua 5.1.
        return '"' + "".join(chr(b) if 32 <= b < 127 and b not in (34, 92) else f"\\{b}" for b in value.encode()) + '"'
    if isinstance(value, list):
        return "{" + ", ".join(lua_literal(item) for item in value) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"[{lua_literal(str(k))}] = {lua_literal(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"{type(value).__name__}: not a JSON value")


def _parse(output: bytes) -> list[tuple[str, str]]:
    """Undo the harness's length-prefixed output: <len>:<status><len>:<message>, repeated."""
    fields: list[str] = []
    position = 0
    while position < len(output):
        colon = output.index(b":", position)
        length = int(output[position:colon])
        fields.append(output[colon + 1 : colon + 1 + length].decode())
        position = colon + 1 + length
    return list(zip(fields[::2], fields[1::2], strict=True))


def run_health_check(script: Path, objects: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(status, message) of the health check for each object, in one interpreter run."""
    program = HARNESS % {
        "sandbox": ", ".join(lua_literal(name) for name in SANDBOX),
        "objects": ", ".join(lua_literal(obj) for obj in objects),
    }
    done = subprocess.run(
        [str(tool_path("lua5.1")), "-", str(script)], input=program.encode(), capture_output=True, check=False
    )
    if done.returncode != 0:
        raise AssertionError(f"lua5.1 failed on {script}: {done.stderr.decode().strip()}")
    return _parse(done.stdout)
