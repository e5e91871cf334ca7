"""The words of pymig's formats, for libFuzzer's dictionaries (``-dict``).

Coverage guides the fuzzer through pymig's own Python, but not through what C parses for it:
``json.loads``, rich's markup, ``struct``.  A token such as ``"workload": []`` or ``[/]`` has
no branch leading to it; given as a dictionary word, mutations insert it whole.  The words are
taken from the code (section names, configuration keys, command and parameter names), so the
dictionaries follow the formats as they change.
"""

from __future__ import annotations

import dataclasses

JSON = [b"null", b"true", b"false", b"[]", b"{}", b'""', b"0", b"-1", b"1e999", b"-0.0",
        b"18446744073709551616", b"4294967296", b"1.5", b'"\\u0000"', b'"x"', b"[[[[",
        b"]]]]", b'{"": ', b", ", b": "]
MARKUP = [b"[", b"]", b"[/]", b"[bold]", b"[/bold]", b"[red]", b"[link=x]", b"\\[", b"[/x]",
          b":smile:", b"\x1b[0m", b"\r", b"\t"]


def quoted(names) -> list[bytes]:
    return [f'"{name}"'.encode() for name in names]


def stream_words() -> list[bytes]:
    """What streams, snapshots and the configuration section are made of."""
    from pymig import stream
    from pymig.fuzz import repair
    from pymig.guest import GuestConfig
    from pymig.guest.workloads import DEFAULTS, WORKLOAD_IDS
    from pymig.kvm.statedesc import DEVICES
    from pymig.machine import CONFIG_IDSTR
    from pymig.ram import RAM_IDSTR
    from pymig.transport import snapshot_index

    words = [stream.MAGIC, stream.FOOTER_MAGIC, repair.PACKET_MAGIC, snapshot_index.INDEX_MAGIC,
             snapshot_index.INDEX_TAIL_MAGIC, CONFIG_IDSTR.encode(), RAM_IDSTR.encode(),
             b"cpu", *(name.encode() for name in DEVICES)]
    keys = [f.name for f in dataclasses.fields(GuestConfig)]
    keys += ["name", "size_bytes", "guest_phys_addr", "id", "size", "page_size", "gpa"]
    keys += sorted({key for params in DEFAULTS.values() for key in params})
    keys += ["image", "kind", "load_address", "entry", "stack"]
    words += quoted(keys)
    words += quoted(["kvm", "simulated", "image", "bootsector", "flat", "flat64",
                     "ram-low", "ram-high", *WORKLOAD_IDS])
    return words + JSON + MARKUP


def control_words() -> list[bytes]:
    """QMP as the control socket speaks it."""
    from pymig.control import COMMANDS
    from pymig.parameters import CAPABILITIES, PARAMETERS

    words = quoted(["execute", "arguments", "id", "exec-oob", "enable", "oob"])
    words += quoted(COMMANDS)
    for command in COMMANDS.values():
        words += quoted(command.args or ())
    words += quoted(p.name for p in PARAMETERS)
    words += quoted(choice for p in PARAMETERS for choice in p.choices)
    words += quoted(CAPABILITIES) + quoted(["capability", "state", "pre-switchover"])
    words += quoted(["tcp:127.0.0.1:0", "unix:/tmp/x", "exec:true", "fd:3", "file:/tmp/x",
                     "tcp:[::1]:0", "defer"])
    return words + JSON + [b"\n", b"\\", b'\\"', b"GET / HTTP/1.1\r\n"]


def write(words: list[bytes], handle) -> None:
    """``words`` in libFuzzer's dictionary format, one quoted word per line."""
    for word in dict.fromkeys(words):  # once each, in order
        escaped = "".join(chr(b) if 0x20 <= b < 0x7F and b not in (0x22, 0x5C) else f"\\x{b:02x}"
                          for b in word)
        handle.write(f'"{escaped}"\n'.encode())
