"""Coverage-guided fuzzing of everything that reads untrusted bytes (atheris, libFuzzer).

A migration stream comes from a peer the destination must not trust, a snapshot from a file
anyone could have written, a control-socket message from any client.  Each harness here feeds
one of those readers what the fuzzer makes of real inputs, and calls anything that is not the
reader's documented refusal a crash:

==========  ===================================================================================
target      what it reads, and what counts as a crash besides a Python exception it lets out
==========  ===================================================================================
stream      a whole stream into a destination guest (StreamReader, the config, the loaders,
            the guest's state check), which then runs for a moment; guest RAM has PROT_NONE
            guard pages on both sides.  Clean: PymigError (and, before loading, the ValueError
            a destination refuses a configuration with).
state       one state entry's payload through its state description and into a guest, for
            every description a guest kind registers, and the configuration section.  Clean:
            PymigError (a config's ValueError as above).
packet      ``core.decode_packet`` into guest memory with guard bytes on both sides, compared
            with the other backend.  Crash: a changed guard byte, a write on refusal outside
            the packet's pages, the backends disagreeing.  Clean: PacketError.
index       a snapshot file's restore index (``read_index``, ``IndexedFileChannel``).  Clean:
            SnapshotIndexError from the parser, PymigError while reading.
analyze     ``pymig analyze`` (both renderings).  Clean: nothing, it reports damage instead.
control     the control socket's JSON splitter and a client connection (unix, or TCP with
            its token handshake), on a session that runs nothing.  Crash: the splitter
            cutting differently when fed in pieces, an answer that is not JSON or says
            "internal error", a TCP client served without the token.
returnpath  what a destination says back: a real migration of a small guest to a peer that
            sends the input on the return path, then the stats as ``pymig migrate`` prints
            them.  Crash: a migration that fails on a bug, completes without LOADED and ACK,
            leaves the source guest stopped, or reports a downtime beyond its own time.
==========  ===================================================================================

Any harness also crashes on a signal (a native fault), a sanitizer report in the ASan build,
an input that runs longer than ``-timeout`` or memory beyond ``-rss_limit_mb``.

Run one: ``python -m pymig.fuzz TARGET [libFuzzer flags] [CORPUS...]``; all of them:
``python -m pymig.fuzz run``; seeds: ``python -m pymig.fuzz seeds DIR``; a saved input again,
without the fuzzer: ``python -m pymig.fuzz repro TARGET FILE...``.  docs/fuzzing.md has more.
"""

from __future__ import annotations

#: Harness modules by target name, in the order the runner runs them.
TARGETS = {
    "stream": "pymig.fuzz.streamload",
    "state": "pymig.fuzz.state",
    "packet": "pymig.fuzz.packet",
    "index": "pymig.fuzz.index",
    "analyze": "pymig.fuzz.analyzer",
    "control": "pymig.fuzz.control",
    "returnpath": "pymig.fuzz.returnpath",
}
