"""Turning ``bench/peers.py`` samples into figures, roofline fractions, target checks and tables.

Pure functions on plain data (no model is loaded here), so they are unit-tested
on hand-made numbers.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from loc3r.runtime.profile_cli import DecoderCost
from loc3r.runtime.roofline import decode_fraction_of_bound, prefill_fraction_of_bound

def table_columns(prefill_lengths: tuple[int, ...]) -> tuple[tuple[str, str, str], ...]:
    """(key in a summary row, header, format) per column; the FLOP-bound column is for the longest prefill."""
    longest = max(prefill_lengths)
    return (
        *((f"prefill_{n}_tps", f"prefill {n} tok/s", "{:.0f}") for n in sorted(prefill_lengths)),
        (f"prefill_{longest}_bound_pct", f"prefill {longest} % FLOP bound", "{:.0f}%"),
        ("decode_tps", f"decode tok/s @{longest}", "{:.2f}"),
        ("decode_bound_pct", "decode % BW bound", "{:.0f}%"),
        ("vision_ms", "vision ms/frame", "{:.1f}"),
        ("answer_ms", "answer ms (video)", "{:.0f}"),
        ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
    )


def p50(samples: list[float]) -> Optional[float]:
    return statistics.median(samples) if samples else None


def summarize(samples: dict, prefill_lengths: tuple[int, ...], cost: Optional[DecoderCost], roofline: Optional[dict],
              decode_context: int, prefill_cost: Optional[DecoderCost] = None) -> dict:
    """One system's row: p50 figures from ``samples`` (op -> list of seconds) and its roofline fractions.

    Decode is held against ``cost`` (the bytes this system's weights take);
    prefill against the FLOPs the model needs for a prompt (``prefill_cost``,
    default ``cost``): every layer for every token, logits for the last only.

    ``samples`` keys: ``prefill_<n>`` (seconds for n tokens), ``decode``
    (seconds per token), ``vision`` (seconds per frame), ``answer`` (seconds).
    """
    row: dict = {}
    for n in prefill_lengths:
        t = p50(samples.get(f"prefill_{n}", []))
        row[f"prefill_{n}_tps"] = None if t is None else n / t
    t = p50(samples.get("decode", []))
    row["decode_tps"] = None if t is None else 1.0 / t
    for key, name in (("vision", "vision_ms"), ("answer", "answer_ms")):
        t = p50(samples.get(key, []))
        row[name] = None if t is None else t * 1e3
    if cost is not None and roofline is not None:
        if row["decode_tps"] is not None:
            row["decode_bytes_per_token"] = cost.decode_bytes(decode_context)
            row["decode_bound_pct"] = 100 * decode_fraction_of_bound(
                row["decode_tps"], row["decode_bytes_per_token"], roofline["bandwidth_gbps"])
        flops = prefill_cost or cost
        for n in prefill_lengths:
            if row.get(f"prefill_{n}_tps") is not None:
                row[f"prefill_{n}_bound_pct"] = 100 * prefill_fraction_of_bound(
                    row[f"prefill_{n}_tps"], flops.prefill_flops_per_token(n), roofline["matmul_gflops"])
    return row


def target_checks(rows: dict) -> list[dict]:
    """Issue 7's targets on one shape's rows (system -> row): each with the measured ratio and whether it is met."""
    checks = []

    def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
        return None if a is None or b is None or b == 0 else a / b

    ours, genai = rows.get("loc3r-int4", {}), rows.get("ort-genai-int4", {})
    r = ratio(ours.get("decode_tps"), genai.get("decode_tps"))
    if r is not None:
        checks.append({"target": "loc3r int4 decode >= onnxruntime-genai int4", "value": r, "goal": 1.0,
                       "met": r >= 1.0, "unit": "x"})
    pct = ours.get("decode_bound_pct")
    if pct is not None:
        checks.append({"target": "loc3r int4 decode >= 70% of the bandwidth bound", "value": pct, "goal": 70.0,
                       "met": pct >= 70.0, "unit": "%"})
    for ours_name, peer_name in (("loc3r-int4", "ort-genai-int4"), ("loc3r-fp32", "ort-genai-fp32")):
        a, b = rows.get(ours_name, {}), rows.get(peer_name, {})
        for key in sorted((k for k in a if k.startswith("prefill_") and k.endswith("_tps")),
                          key=lambda k: int(k.split("_")[1])):
            r = ratio(a.get(key), b.get(key))
            if r is not None:
                n = key.split("_")[1]
                checks.append({"target": f"{ours_name} prefill {n} >= 0.9x {peer_name}", "value": r, "goal": 0.9,
                               "met": r >= 0.9, "unit": "x"})
    peers = [row.get("answer_ms") for name, row in rows.items() if not name.startswith("loc3r-")]
    peers = [p for p in peers if p is not None]
    for name in ("loc3r-int4", "loc3r-fp32"):
        ours_ms = rows.get(name, {}).get("answer_ms")
        if ours_ms and peers:
            r = min(peers) / ours_ms
            checks.append({"target": f"{name} answer >= 10x faster than the fastest peer at question time",
                           "value": r, "goal": 10.0, "met": r >= 10.0, "unit": "x"})
    return checks


def markdown_table(rows: dict, columns: tuple[tuple[str, str, str], ...]) -> str:
    """A markdown table: one line per system, ``n/a`` where a system has no figure."""
    head = "| system | " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|---|" + "---:|" * len(columns)
    lines = [head, rule]
    for system, row in rows.items():
        cells = [fmt.format(row[key]) if row.get(key) is not None else "n/a" for key, _, fmt in columns]
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def checks_text(checks: list[dict]) -> str:
    lines = []
    for c in checks:
        value = f"{c['value']:.1f}%" if c["unit"] == "%" else f"{c['value']:.2f}x"
        lines.append(f"- [{'x' if c['met'] else ' '}] {c['target']}: {value}")
    return "\n".join(lines)


def write_json(path: Path, result: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=_jsonable))
    return path


def _jsonable(value):
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
