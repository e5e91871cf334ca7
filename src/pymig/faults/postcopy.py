"""The fault campaign's post-copy trials: a fault after the switch, and one during a recovery.

A post-copy trial migrates with ``postcopy-ram`` on both sides and switches after the first
pass (``x-postcopy-after 1``); the push after the switch goes at the campaign's post-copy cap
(``x-switchover-capped``), so that it lasts long enough to be hit.  Its phases are reached by
watching, as the others are:

- ``postcopy-active``: the source reports ``postcopy-active`` and its ``postcopy`` stats count
  a pushed page (the destination runs the guest: the push starts after its ACK); the proxy
  then lets a random 0-1 MiB more of the stream through and holds the next bytes;
- ``postcopy-recover``: as above, a plain cut first (both sides pause); the destination gets
  ``migrate-recover``, the source ``migrate URI resume=true`` to a new proxy in front of it,
  and that proxy holds the recovered connection's bytes after a random 0-256 KiB (its header,
  RESUME, the pages asked for again and pushed);
- ``postcopy-preempt`` (tcp and unix, ``postcopy-preempt`` on both sides): the proxy forwards
  the preempt channel as its second connection and the fault goes there (a cut, a stall, a
  byte flipped in a page asked for) once the push is under way.

What a post-copy trial must leave differs from pre-copy's, because from the commit on neither
side holds the whole guest (QEMU's semantics):

- a fault that leaves both processes alive (a cut of either direction, a stall the campaign
  ends as a dead network's timeout would, a corrupted byte the destination refuses) pauses
  both (``postcopy-paused``), the source's vCPUs stopped, the destination's guest running with
  a vCPU that needs a missing page waiting for it.  The campaign recovers it directly
  (``migrate-recover`` on a new URI, ``migrate resume=true``): the migration must complete, the
  destination's guest run with its self-check clean (every page it verifies came intact, so
  no corrupted page was placed), and migrate again; the source ends as QEMU's does after a
  post-copy, its guest moved away and not runnable (``cont`` refused);
- ``kill-dst``: the guest is lost by design.  The source must live on, paused
  (``postcopy-paused``, or ``failed``) with the reason in ``query-migrate``, never run its
  guest (its newer pages were only at the destination: that would be a split brain), refuse
  ``cont``, leak nothing, and quit cleanly;
- ``kill-src``: lost by design too.  The destination must live on in ``postcopy-paused`` with
  the reason, its vCPUs waiting rather than reading made-up pages, and quit cleanly.
"""

from __future__ import annotations

import os
import time

from pymig.faults.proxy import FaultProxy, Trigger

PHASES = ("postcopy-active", "postcopy-recover", "postcopy-preempt")
#: The push after the switch goes at this cap: a working set of megabytes takes a good part
#: of a second, long enough for the proxy to land inside it.
PUSH_BANDWIDTH = 16_000_000
#: How far into the push (postcopy-active, postcopy-preempt) or the recovered connection
#: (postcopy-recover) the fault lands: a random number of bytes below this.
PUSH_SKIP = 1 << 20
RECOVER_SKIP = 256 << 10
PREEMPT_SKIP = 64 << 10
LOST = "none (lost by design: post-copy after the switch)"
ENDED_SOURCE = ("completed", "postcopy-paused", "failed", "cancelled", "dead")
ENDED_DESTINATION = ("completed", "postcopy-paused", "failed", "dead")


class PostcopyTrialMixin:
    """A :class:`~pymig.faults.runner.SocketTrial` for the post-copy phases (mixed in
    before it: ``run`` keeps its frame, the steps are these)."""

    postcopy = True

    def configure(self, src) -> None:
        preempt = self.r.phase == "postcopy-preempt"
        src.cmd("migrate-set-capabilities", capabilities=[
            {"capability": "postcopy-ram", "state": True},
            {"capability": "postcopy-preempt", "state": preempt}])
        src.cmd("migrate-set-parameters", **{"max-bandwidth": PUSH_BANDWIDTH,
                                               "compression": "none", "x-postcopy-after": 1,
                                               "x-switchover-capped": True})

    # -- reaching the phase ------------------------------------------------------------------
    def drive(self, src, dst, proxy: FaultProxy) -> None:
        r = self.r
        self.recover_proxy = None
        src.cmd("migrate", uri=self.uri)
        if not self.until_pushing(src) or r.hit:
            return  # (never switched, or the push was over: recorded)
        if r.phase == "postcopy-active":
            proxy.arm(Trigger("forward", skip=self.rng.randrange(0, PUSH_SKIP)),
                      lambda what: self.inject_postcopy(src, dst, what))
            return
        if r.phase == "postcopy-preempt":
            # the preempt channel is the proxy's second connection: the next bytes on it, a
            # page asked for (or, with none asked for in a second, a keep-alive)
            proxy.arm(Trigger("forward", skip=self.rng.randrange(0, PREEMPT_SKIP), link=1),
                      lambda what: self.inject_postcopy(src, dst, what))
            return
        # postcopy-recover: a first cut, both sides pause, then the recovery is hit
        proxy.inject("cut")
        r.detail = "cut while pushing"
        if not self.until_paused(src, dst):
            r.problems.append(f"the first cut did not pause both sides: source "
                              f"{self.mig_status(src)}, destination {self.mig_status(dst)}")
            return
        bound = dst.cmd("migrate-recover", uri=self.fresh_uri("recover"))["uri"]
        self.recover_proxy = second = self.proxy_to(bound)
        second.arm(Trigger("forward", skip=self.rng.randrange(0, RECOVER_SKIP)),
                   lambda what: self.inject_postcopy(src, dst, what, recovering=True))
        src.cmd("migrate", uri=self.proxied_uri(second), resume=True)

    def until_pushing(self, src) -> bool:
        """Whether the source switched and pushes pages (the destination runs the guest)."""
        r = self.r
        status = self.wait_status(src, ("postcopy-active",), 60)
        if status != "postcopy-active":
            r.problems.append(f"the migration never switched to post-copy: {status}")
            return False
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            info = src.try_cmd("query-migrate") or {}
            if info.get("status") != "postcopy-active":
                break
            if info.get("postcopy", {}).get("pages-pushed", 0) > 0:
                return True
            time.sleep(0.005)
        r.hit = self.mig_status(src) or "not reached"
        r.detail = "the push was over before the fault"
        return True  # (what the trial left is checked all the same)

    def inject_postcopy(self, src, dst, what: str, recovering: bool = False) -> str:
        """The proxy's callback: record the phase hit, then kill or return the fault."""
        r = self.r
        status = self.mig_status(src)
        if recovering and status in ("postcopy-recover", "postcopy-active"):
            hit = "postcopy-recover"
        elif status == "postcopy-active" and r.phase == "postcopy-preempt" \
                and "link 1" in what:
            hit = "postcopy-preempt"
        else:
            hit = {"active": "live"}.get(status, status)
        r.hit = r.hit or hit
        r.detail = (r.detail + "; " if r.detail else "") + f"at {what}"
        if r.fault == "kill-src":
            src.kill()
            return "pass"
        if r.fault == "kill-dst":
            dst.kill()
            return "pass"
        return r.fault

    def until_paused(self, src, dst, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (self.mig_status(src), self.mig_status(dst)) == ("postcopy-paused",) * 2:
                return True
            time.sleep(0.02)
        return False

    def mig_status(self, proc) -> str:
        if not proc.alive:
            return "dead"
        info = proc.try_cmd("query-migrate")
        return info.get("status", "") if info is not None else "no answer"

    def fresh_uri(self, name: str) -> str:
        if self.r.transport == "unix":
            path = os.path.join(self.dir, f"{name}-{len(self.recover_uris)}.mig")
            self.recover_uris.append(path)
            return f"unix:{path}"
        return "tcp:127.0.0.1:0"

    def proxy_to(self, bound: str) -> FaultProxy:
        if bound.startswith("unix:"):
            listen = os.path.join(self.dir, f"proxy-{len(self.recover_uris)}")
            return FaultProxy(listen, bound.removeprefix("unix:"), rng=self.rng)
        port = int(bound.rsplit(":", 1)[1])
        return FaultProxy(("127.0.0.1", 0), ("127.0.0.1", port),
                          tls=self.r.transport == "tls", rng=self.rng)

    @staticmethod
    def proxied_uri(proxy: FaultProxy) -> str:
        if isinstance(proxy.address, str):
            return f"unix:{proxy.address}"
        return f"tcp:127.0.0.1:{proxy.address[1]}"

    # -- after the fault ---------------------------------------------------------------------
    def settle(self, src, dst, proxy: FaultProxy) -> None:
        """Wait for both ends to decide.  A connection still open three seconds after the
        fault (a stall) ends then, as a dead network's timeouts would end it: after the
        commit there is nothing to cancel (both sides hold part of the guest)."""
        r = self.r
        proxies = [p for p in (proxy, self.recover_proxy) if p is not None]
        faulted = self.recover_proxy if r.phase == "postcopy-recover" \
            and self.recover_proxy is not None else proxy
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not faulted.fired.is_set():
            if self.mig_status(src) in ("completed", "dead", "failed") or r.problems:
                break
            time.sleep(0.01)
        if faulted.fired.is_set():
            end = time.monotonic() + 3.0
            while time.monotonic() < end and not (
                    self.mig_status(src) in ENDED_SOURCE
                    and self.mig_status(dst) in ENDED_DESTINATION):
                time.sleep(0.02)
        elif not r.problems:
            r.hit = r.hit or self.mig_status(src) or "not reached"
        for p in proxies:
            p.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (
                self.mig_status(src) in ENDED_SOURCE
                and self.mig_status(dst) in ENDED_DESTINATION):
            time.sleep(0.02)
        r.detail += f"; then source {self.mig_status(src)}, destination {self.mig_status(dst)}"
        if r.fault == "corrupt" and faulted.fired.is_set():
            # every byte after the switch is checked (record checksums, the packets' own,
            # TLS's): the destination refuses the flipped one and says so, or something of
            # the stream went into guest RAM unchecked
            info = dst.try_cmd("query-migrate") or {}
            if info.get("status") != "postcopy-paused" or not info.get("error-desc"):
                r.problems.append(f"the destination did not refuse the corrupted stream "
                                  f"({info.get('status')})")
            else:
                r.detail += f" ({info['error-desc'][:100]})"
        if src.alive and dst.alive and self.mig_status(src) == "postcopy-paused" \
                and self.mig_status(dst) == "postcopy-paused":
            self.recover(src, dst)

    def recover(self, src, dst) -> None:
        """The operator's answer to a paused post-copy: a new connection, straight."""
        r = self.r
        try:
            bound = dst.cmd("migrate-recover", uri=self.fresh_uri("again"))["uri"]
            src.cmd("migrate", uri=bound, resume=True)
        except Exception as exc:  # noqa: BLE001 - reported as the trial's problem
            r.problems.append(f"the recovery was refused: {exc}")
            return
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            states = (self.mig_status(src), self.mig_status(dst))
            if states == ("completed", "completed") or "dead" in states:
                break
            time.sleep(0.05)
        r.detail += "; recovered" if states == ("completed", "completed") else \
            f"; recovery ended in {states}"

    def judge(self, src, dst, baseline: tuple[int, int]) -> None:
        r = self.r
        time.sleep(0.1)
        r.source, r.destination = self.guest_state(src), self.guest_state(dst)
        src_info = src.try_cmd("query-migrate") or {}
        dst_info = dst.try_cmd("query-migrate") or {}
        src_status, dst_status = src_info.get("status", "dead"), dst_info.get("status", "dead")
        switched = r.hit in PHASES or r.hit == "completed" or src_status.startswith(
            "postcopy") or dst_status.startswith("postcopy") or dst_status == "completed"
        if not switched:
            r.problems.append(f"the fault landed before the switch ({r.hit})")
        # Whatever happened, the source never runs its guest again: its newer pages are the
        # destination's.
        if r.source == "running":
            r.problems.append("the source runs its guest after the switch to post-copy")
        if src.alive and r.source != "running":
            try:
                src.cmd("cont")
                r.source = self.guest_state(src)
                r.problems.append("the source took cont after the switch to post-copy")
            except Exception:  # noqa: BLE001 - refused, as it must be
                pass
        if r.fault in ("kill-dst", "kill-src") and (src.killed or dst.killed):
            self.judge_lost(src, dst, src_info, dst_info)
        else:
            self.judge_recovered(src, dst, src_status, dst_status)
        if src.alive:
            counts = self.settled(src, baseline)
            if counts != baseline:
                r.problems.append(f"src: descriptors/threads {baseline} -> {counts} "
                                  f"({self.describe(src)})")
            self.check_files(src)
        for path in self.recover_uris if not dst.killed else ():  # (SIGKILL cleans nothing)
            if os.path.exists(path):
                r.problems.append(f"dst: its recovery socket file {os.path.basename(path)} "
                                  f"is still there")
        for proc in (src, dst):
            if proc.alive and not proc.killed:
                self.quits(proc)

    def judge_lost(self, src, dst, src_info: dict, dst_info: dict) -> None:
        r = self.r
        r.outcome = LOST
        survivor, info = (src, src_info) if dst.killed else (dst, dst_info)
        if not survivor.alive:
            r.problems.append(f"the {survivor.name} did not survive the {r.fault} "
                              f"({self.guest_state(survivor)})")
            return
        status = info.get("status", "")
        wanted = ("postcopy-paused", "failed") if survivor is src else ("postcopy-paused",)
        if status not in wanted:
            r.problems.append(f"{survivor.name}: {status or 'no status'} after the "
                              f"{r.fault}, not {' or '.join(wanted)}")
        if not info.get("error-desc"):
            r.problems.append(f"{survivor.name}: no reason in query-migrate ({status})")

    def judge_recovered(self, src, dst, src_status: str, dst_status: str) -> None:
        r = self.r
        if dst_status != "completed" or r.destination != "running":
            r.problems.append(f"the migration did not complete: source {src_status}, "
                              f"destination {dst_status} ({r.destination})")
            r.outcome = "none"
            return
        r.outcome = "destination"
        # (a source whose SHUT alone was lost stays paused: the destination has every page)
        if src_status not in ("completed", "postcopy-paused"):
            r.problems.append(f"src: {src_status} after a completed post-copy")
        self.verify(dst)
        self.check_clean_destination(dst)
        self.migrate_again(dst)

    def quits(self, proc) -> None:
        """A survivor ends on ``quit`` (a destination paused in post-copy releases the vCPUs
        waiting in their faults first): a hang here is a finding."""
        proc.try_cmd("quit")
        try:
            proc.proc.wait(20)
        except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired
            self.r.problems.append(f"{proc.name}: still alive 20 s after quit")
            return
        if proc.proc.returncode not in (0,):
            self.r.problems.append(f"{proc.name}: exited {proc.proc.returncode} on quit")
