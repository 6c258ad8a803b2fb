"""DPRoPE factor computation: ours vs a faithful re-implementation of the reference double loop.

    python bench/factors.py            # ours on 4 settings + the reference loop on LLaMA2 4k->8k (~1 min)
    python bench/factors.py --quick    # skip the reference loop

Each measurement runs in its own process so peak RSS is that setting's own.  The engine computes with NumPy on one
thread (its histogram is a bincount per chunk of positions).  The reference loop is the code of
tests/reference_loop.py (the same float32 operations, one Python iteration per (pair, position)), on one torch
thread.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _measure import run_child  # noqa: E402

OURS = """
import sys
import dprope
compute = dprope.compute_factors  # resolves the lazy name: NumPy's import is not timed (torch's never was)
o, t = int(sys.argv[1]), int(sys.argv[2])
_t = _time.perf_counter()
r = compute(rope_theta=10000, head_dim=128, original_length=o, target_length=t)
wall = _time.perf_counter() - _t
print(_json.dumps({"wall_s": wall, "peak_rss_mb": _res.getrusage(_res.RUSAGE_SELF).ru_maxrss / 1024,
                   "interpolated": len(r.pairs_for("interpolation"))}))
"""

REFERENCE = """
import sys
import torch
torch.set_num_threads(1)
from reference_loop import reference_dprope
_t = _time.perf_counter()
f, _ = reference_dprope(10000, 128, int(sys.argv[1]), int(sys.argv[2]))
wall = _time.perf_counter() - _t
print(_json.dumps({"wall_s": wall, "peak_rss_mb": _res.getrusage(_res.RUSAGE_SELF).ru_maxrss / 1024,
                   "interpolated": int((f != 1).sum())}))
"""

SETTINGS = [(4096, 8192), (4096, 16384), (8192, 131072), (8192, 2097152)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="skip the reference loop (about a minute)")
    args = ap.parse_args()
    print(f"{'setting':>18} {'wall s':>9} {'peak RSS MB':>12} {'interp. pairs':>13}")
    ours = {}
    for o, t in SETTINGS:
        r = run_child(OURS, str(o), str(t))
        ours[(o, t)] = r
        print(f"{o:>8}->{t:<9} {r['wall_s']:>9.3f} {r['peak_rss_mb']:>12.0f} {r['interpolated']:>13}")
    ok = ours[(8192, 2097152)]["wall_s"] < 10 and ours[(8192, 2097152)]["peak_rss_mb"] < 1024
    print(f"8k->2M target (< 10 s, < 1024 MB): {'met' if ok else 'MISSED'}")
    if args.quick:
        return 0 if ok else 1
    ref = run_child(REFERENCE, "4096", "8192")
    mine = ours[(4096, 8192)]
    ratio = ref["wall_s"] / mine["wall_s"]
    print(f"reference loop 4096->8192 (1 thread): {ref['wall_s']:.1f} s, {ref['interpolated']} pairs interpolated")
    print(f"ours           4096->8192 (NumPy): {mine['wall_s']:.4f} s, {mine['interpolated']} pairs interpolated")
    print(f"speed-up: {ratio:.0f}x (target >= 1000x): {'met' if ratio >= 1000 else 'MISSED'}")
    same = ref["interpolated"] == mine["interpolated"]
    print(f"same choice as the reference: {same}")
    return 0 if ok and ratio >= 1000 and same else 1


if __name__ == "__main__":
    sys.exit(main())
