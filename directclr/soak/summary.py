"""The soak's figures: summary.json (rewritten after every cycle), the closing report and each
cycle's line."""
from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from .judge import KNOWN_DEVIATION

if TYPE_CHECKING:
    from .run import Soak


def summarize(soak: Soak, started: float, args, interrupted: str | None) -> dict:
    cycles = soak.cycles
    by_kind: dict = defaultdict(lambda: {"delivered": 0, "not_delivered": 0,
                                         "exit_codes": Counter()})
    by_moment: dict = defaultdict(lambda: {"delivered": 0, "not_delivered": 0,
                                           "temporary_left": 0})
    by_target: Counter = Counter()
    for cycle in cycles:
        faults = [(r["fault"], r["exit_code"]) for r in cycle["launches"] if r["fault"]]
        for fault, exit_code in faults + [(f, None) for f in cycle.get("not_reached", [])]:
            hit = "delivered" if fault.get("delivered") else "not_delivered"
            by_kind[fault["kind"]][hit] += 1
            by_moment[fault["moment"]][hit] += 1
            if fault.get("delivered"):
                by_target[fault["target"]] += 1
                by_kind[fault["kind"]]["exit_codes"][str(exit_code)] += 1
                by_moment[fault["moment"]]["temporary_left"] += bool(fault.get("temporary_left"))
    verdicts = Counter(c["verdict"] for c in cycles)
    known = [{"cycle": c["cycle"], "launch": r["number"], "reason": r["reason"], "log": r["log"]}
             for c in cycles for r in c["launches"] if r["verdict"] == "known"]

    def listing(verdict: str) -> list[dict]:
        return [{"cycle": c["cycle"], "configuration": c["configuration"]["name"],
                 "reason": c["reason"], "replay": c["replay"], "logs": c["folder"]}
                for c in cycles if c["verdict"] == verdict]
    return {
        "seed": args.seed, "minutes": args.minutes, "cycles_asked": args.cycles,
        "cycle_replayed": args.cycle, "faults_per_cycle": args.faults, "strict": args.strict,
        "code": {"fingerprint": soak.fingerprint, "commit": soak.commit,
                 "snapshot": str(soak.code)},
        "machine": soak.machine, "dali": soak.dali, "interrupted": interrupted,
        "wall_s": round(time.monotonic() - started, 1),
        "totals": {"cycles": len(cycles), "exact": verdicts["exact"],
                   "inexact": verdicts["inexact"], "failed": verdicts["failed"],
                   "faults_delivered": sum(k["delivered"] for k in by_kind.values()),
                   "faults_not_delivered": sum(k["not_delivered"] for k in by_kind.values()),
                   "known_deviations": len(known)},
        "faults_by_kind": {kind: {**v, "exit_codes": dict(v["exit_codes"])}
                           for kind, v in sorted(by_kind.items())},
        "faults_by_moment": dict(sorted(by_moment.items())),
        "faults_by_target": dict(sorted(by_target.items())),
        "inexact": listing("inexact"), "failures": listing("failed"), "known": known,
        "cycles": cycles,
    }


def report(summary: dict, path: Path) -> str:
    totals = summary["totals"]
    lines = [f"soak: {totals['cycles']} cycles in {summary['wall_s'] / 60:.1f} min (seed "
             f"{summary['seed']}, code {summary['code']['commit']}, "
             f"{summary['code']['fingerprint']})"
             + (f", interrupted by {summary['interrupted']}" if summary["interrupted"] else ""),
             f"faults delivered: {totals['faults_delivered']} ({totals['faults_not_delivered']} "
             "not delivered: the run ended first)"]
    for kind, counts in summary["faults_by_kind"].items():
        codes = ", ".join(f"{code}: {n}" for code, n in sorted(counts["exit_codes"].items()))
        lines.append(f"  {kind:9s} {counts['delivered']:3d}  exit codes {{{codes}}}")
    if totals["faults_delivered"]:
        lines.append("  by moment: " + ", ".join(
            f"{moment} {counts['delivered']}" + (f" ({counts['temporary_left']} killed "
                                                "mid-write)" if counts["temporary_left"] else "")
            for moment, counts in summary["faults_by_moment"].items()))
        lines.append("  by target: " + ", ".join(f"{target} {n}" for target, n
                                                 in summary["faults_by_target"].items()))
    lines.append(f"final weights: {totals['exact']} exact, {totals['inexact']} inexact; "
                 f"{totals['failed']} failed")
    if summary["known"]:
        lines.append(f"known deviations: {len(summary['known'])} "
                     f"({'failures under --strict' if summary['strict'] else 'not failures'}"
                     f"): {KNOWN_DEVIATION}")
    for verdict in ("inexact", "failures"):
        for item in summary[verdict]:
            lines.append(f"{verdict.rstrip('s').upper()} cycle {item['cycle']} "
                         f"({item['configuration']}): {item['reason']}\n"
                         f"  replay: {item['replay']}\n  logs: {item['logs']}")
    lines.append(f"summary: {path}")
    return "\n".join(lines)


def cycle_line(result: dict) -> str:
    faults = []
    for record in result["launches"]:
        if record["fault"]:
            fault = record["fault"]
            landed = "exit " + str(record["exit_code"]) if fault.get("delivered") else \
                "not delivered"
            faults.append(f"{fault['kind']} to {fault['target']} at {fault['moment']}: {landed}")
    return (f"cycle {result['cycle']} {result['configuration']['name']} "
            f"({result['seconds']:.0f} s): {result['verdict']}; "
            + ("; ".join(faults) or "no faults")
            + ("" if result["verdict"] == "exact" else f" ({result['reason']})"))


def write_summary(summary: dict, path: Path) -> None:
    from ..files import atomic_write
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(summary, indent=1) + "\n"))
