"""CPU and memory accounting of the benchmark, from /proc: pure parsers of its text, and readers."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping

__all__ = ["all_ticks", "cpu_shares", "others_delta", "proc_cpu_ticks", "proc_is_kthread", "proc_rss_kb",
           "read_proc", "rss_of", "system_ticks", "ticks_of"]


def proc_cpu_ticks(stat_text: str) -> int:
    """utime + stime (clock ticks) from the text of /proc/<pid>/stat."""
    fields = stat_text.rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3); utime and stime are fields 14 and 15.
    return int(fields[11]) + int(fields[12])


def proc_rss_kb(status_text: str, key: str = "VmRSS") -> int:
    """VmRSS (or another Vm* line) in kB from the text of /proc/<pid>/status; 0 if absent."""
    for line in status_text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def system_ticks(stat_text: str) -> dict[str, int]:
    """The aggregate `cpu` line of /proc/stat as named tick counts plus `total`."""
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    for line in stat_text.splitlines():
        if line.startswith("cpu "):
            values = [int(v) for v in line.split()[1:9]]
            out = dict(zip(names, values))
            out["total"] = sum(values)
            return out
    raise ValueError("no aggregate cpu line in /proc/stat")


def cpu_shares(
    proc_ticks: Mapping[str, int],
    sys_before: Mapping[str, int],
    sys_after: Mapping[str, int],
    ncpu: int,
    wall_s: float,
    extra_seconds: Mapping[str, float] | None = None,
    hz: int = 100,
) -> dict[str, float]:
    """Where the CPU went over a window of `wall_s` seconds, in % of one core (like top).

    `proc_ticks` are per-category process tick deltas (e.g. workers,
    controller); `extra_seconds` are CPU seconds known another way (iperf3's
    own report). Adds `kernel irq+softirq` and `idle` from /proc/stat and
    what remains of ncpu*100 (processes not seen, unattributed
    kernel time), named `unaccounted`. Wall time, not the /proc/stat total, is the denominator:
    on a VM whose vCPUs the host deschedules, /proc/stat misses ticks that
    the per-process runtimes still count.
    """
    scale = 100.0 / (max(wall_s, 1e-9) * hz)
    out = {name: ticks * scale for name, ticks in proc_ticks.items()}
    for name, seconds in (extra_seconds or {}).items():
        out[name] = seconds * hz * scale
    irq = (sys_after["irq"] - sys_before["irq"]) + (sys_after["softirq"] - sys_before["softirq"])
    idle = (sys_after["idle"] - sys_before["idle"]) + (sys_after["iowait"] - sys_before["iowait"])
    out["kernel irq+softirq"] = irq * scale
    out["idle"] = idle * scale
    out["unaccounted"] = max(ncpu * 100.0 - sum(out.values()), 0.0)
    return out


def read_proc(path: str) -> str:
    with open(path) as f:
        return f.read()


def ticks_of(pids: Mapping[str, int]) -> dict[str, int]:
    out = {}
    for name, pid in pids.items():
        with contextlib.suppress(OSError, IndexError, ValueError):
            out[name] = proc_cpu_ticks(read_proc(f"/proc/{pid}/stat"))
    return out


PF_KTHREAD = 0x00200000


def proc_is_kthread(stat_text: str) -> bool:
    """Is this /proc/<pid>/stat a kernel thread's (PF_KTHREAD in the flags field)?"""
    return bool(int(stat_text.rsplit(")", 1)[1].split()[6]) & PF_KTHREAD)


def all_ticks() -> dict[int, tuple[int, bool]]:
    """(utime + stime, kernel thread?) of every process now, for "other" CPU use during a window."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                text = read_proc(f"/proc/{entry}/stat")
                out[int(entry)] = (proc_cpu_ticks(text), proc_is_kthread(text))
    return out


def others_delta(before: Mapping[int, tuple[int, bool]], after: Mapping[int, tuple[int, bool]],
                 ours: Iterable[int]) -> dict[str, int]:
    """Ticks used in the window by processes not in `ours`, split into kernel threads and other processes.

    New processes count whole; those that exited in the window are lost.
    """
    mine = set(ours)
    out = {"kernel threads": 0, "other processes": 0}
    for pid, (t, kthread) in after.items():
        if pid not in mine:
            out["kernel threads" if kthread else "other processes"] += max(t - before.get(pid, (0, kthread))[0], 0)
    return out


def rss_of(pids: Mapping[str, int]) -> dict[str, int]:
    out = {}
    for name, pid in pids.items():
        with contextlib.suppress(OSError, ValueError):
            out[name] = proc_rss_kb(read_proc(f"/proc/{pid}/status"))
    return out


def _category(name: str) -> str:
    """'a.worker1' -> 'workers', 'b.controller' -> 'controller', 'a.daemon' -> 'tunnel daemons'."""
    role = name.split(".", 1)[-1]
    if role.startswith("worker"):
        return "l3ptp workers"
    if role.startswith("daemon"):
        return "tunnel daemons"
    return f"l3ptp {role}"
