#!/usr/bin/env python3
"""Where a kernel's time goes, per SASS instruction, from Nsight Compute's source page.

Input: the CSV that `ncu --import REPORT.ncu-rep --page source --csv --print-source sass` writes for a report
collected with `--section SourceCounters` (one launch of one kernel). Prints
  - the warp-stall samples by reason over the whole kernel;
  - the instructions grouped by how often they ran (a loop body's instructions all run the same number of times,
    so the groups separate a main loop from the once-a-CTA prologue and epilogue and from other warp roles) with
    each group's share of the samples;
  - for the group holding the most samples (or the one given with --count), its stall reasons and opcode mix;
  - the instructions with the most samples.
Session 42 used it on the forward's causal D 64 and D 128 kernels (docs/flex_cuda_notes.md), collected on the GPU
machine with

  ncu --clock-control none --kernel-name flex_fwd_wgmma --launch-skip 2 --launch-count 1 \
      --section SourceCounters --import-source no -o fwd bench_flex_cuda --backend fused --case causal --reps 1 --warmup 2
  ncu --import fwd.ncu-rep --page source --csv --print-source sass > fwd_source.csv

and read anywhere with Python 3:

  tools/ncu_source_summary.py SOURCE.csv [--count N] [--top K]
"""
import argparse
import collections
import csv
import re
import sys


def load(path):
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except OSError as e:
        sys.exit(f"{path}: {e.strerror}")
    # The first row names the kernel; the header row is the one that starts with "Address".
    start = next((i for i, r in enumerate(rows) if r and r[0] == "Address"), None)
    if start is None:
        sys.exit(f"{path}: no 'Address' header row; expected the CSV of `ncu --import ... --page source --csv "
                 "--print-source sass`")
    header, data = rows[start], [r for r in rows[start + 1:] if r and r[0].startswith("0x")]
    col = {name: i for i, name in enumerate(header)}
    for needed in ("Source", "# Samples", "Instructions Executed"):
        if needed not in col:
            sys.exit(f"{path}: no '{needed}' column; collect with --section SourceCounters and export "
                     "--page source --csv --print-source sass")
    stalls = [h for h in header if h.startswith("stall_") and "(Not Issued)" not in h]
    return data, col, stalls


def num(row, col, name):
    v = row[col[name]].replace(",", "")
    return int(float(v)) if v not in ("", "-") else 0


def opcode(source):
    # "@!P0  BRA 0x..." -> "BRA"; "HGMMA.64x64x16.F32.BF16 ..." -> "HGMMA"
    m = re.match(r"(@!?U?P\w+\s+)?([A-Z0-9_]+)", source.strip())
    return m.group(2) if m else source.strip()


def stall_shares(rows, col, stalls, total):
    agg = collections.Counter()
    for r in rows:
        for s in stalls:
            agg[s] += num(r, col, s)
    return [(s[len("stall_"):], 100.0 * v / total) for s, v in agg.most_common() if v > 0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("csv")
    ap.add_argument("--count", type=int, help="the execution count of the group to break down (default: the group "
                                              "with the most samples)")
    ap.add_argument("--top", type=int, default=15, help="instructions listed by samples")
    a = ap.parse_args()
    data, col, stalls = load(a.csv)
    samples = sum(num(r, col, "# Samples") for r in data)
    executed = sum(num(r, col, "Instructions Executed") for r in data)
    if samples == 0:
        sys.exit(f"{a.csv}: no samples")
    print(f"{len(data)} SASS instructions, {executed} warp instructions executed, {samples} samples")
    print("stall reasons, whole kernel: " +
          ", ".join(f"{s} {p:.1f}%" for s, p in stall_shares(data, col, stalls, samples)[:10]))

    groups = collections.defaultdict(list)
    group_samples = collections.Counter()
    for r in data:
        count = num(r, col, "Instructions Executed")
        groups[count].append(r)
        group_samples[count] += num(r, col, "# Samples")
    ranked = [count for count, _ in group_samples.most_common()]
    print("\ngroups by execution count (count: instructions, share of samples)")
    for count in ranked[:10]:
        print(f"  {count:>12}: {len(groups[count]):5} instructions, {100.0 * group_samples[count] / samples:5.1f}%")

    count = a.count if a.count is not None else ranked[0]
    rows = groups.get(count, [])
    if not rows:
        sys.exit(f"no instruction ran {count} times")
    print(f"\nthe group run {count} times ({len(rows)} instructions)")
    print("  stall reasons: " +
          ", ".join(f"{s} {p:.1f}%" for s, p in stall_shares(rows, col, stalls, group_samples[count] or 1)[:10]))
    mix = collections.Counter(opcode(r[col["Source"]]) for r in rows)
    print("  opcodes: " + ", ".join(f"{op} {n}" for op, n in mix.most_common(20)))

    print(f"\nthe {a.top} instructions with the most samples (address, samples, share, main reason, executed, SASS)")
    for r in sorted(data, key=lambda r: -num(r, col, "# Samples"))[:a.top]:
        s = num(r, col, "# Samples")
        reason = max(stalls, key=lambda k: num(r, col, k))[len("stall_"):] if stalls else "-"
        print(f"  {r[col['Address']][-6:]} {s:7} {100.0 * s / samples:5.1f}% {reason:16} "
              f"{num(r, col, 'Instructions Executed'):>10}  {r[col['Source']].strip()[:70]}")


if __name__ == "__main__":
    main()
