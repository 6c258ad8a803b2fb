"""Extend a multi-GB sharded checkpoint: `dprope extend` vs `cp -r` of the same directory, same run.

    python bench/extend.py [--repeats 3]

The checkpoint is a Llama-3.2-1B-shaped model of random bf16 tensors (~2.5 GB in 5 shards, cached under
bench/.data).  Both commands read from a warm page cache; each is run --repeats times, alternating, and the
median is reported.  Targets: wall time <= 1.2x the copy, peak RSS < 500 MB.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import DATA, big_llama, dir_size, measure, median_of  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    src = big_llama()
    size_gb = dir_size(src) / 1e9
    dprope = str(Path(sys.executable).with_name("dprope"))
    cp_out, ours_out = DATA / "cp-out", DATA / "extend-out"
    cps, ours = [], []
    shutil.rmtree(cp_out, ignore_errors=True)
    measure(["cp", "-r", str(src), str(cp_out)])  # warm the page cache
    for _ in range(args.repeats):
        shutil.rmtree(cp_out, ignore_errors=True)
        shutil.rmtree(ours_out, ignore_errors=True)
        cps.append(measure(["cp", "-r", str(src), str(cp_out)]))
        shutil.rmtree(cp_out, ignore_errors=True)
        ours.append(measure([dprope, "extend", str(src), str(ours_out), "--target-length", "32768"]))
    shutil.rmtree(cp_out, ignore_errors=True)
    shutil.rmtree(ours_out, ignore_errors=True)
    c, o = median_of(cps), median_of(ours)
    ratio = o["wall_s"] / c["wall_s"]
    print(f"checkpoint: {src} ({size_gb:.2f} GB, {len(list(src.glob('*.safetensors')))} shards), "
          f"median of {args.repeats}")
    print(f"{'':>16} {'wall s':>8} {'peak RSS MB':>12}")
    print(f"{'cp -r':>16} {c['wall_s']:>8.2f} {c['peak_rss_mb']:>12.0f}")
    print(f"{'dprope extend':>16} {o['wall_s']:>8.2f} {o['peak_rss_mb']:>12.0f}")
    ok_t, ok_m = ratio <= 1.2, o["peak_rss_mb"] < 500
    print(f"time ratio (ours / cp): {ratio:.2f}x (target <= 1.2x): {'met' if ok_t else 'MISSED'}")
    print(f"peak RSS {o['peak_rss_mb']:.0f} MB (target < 500 MB): {'met' if ok_m else 'MISSED'}")
    return 0 if ok_t and ok_m else 1


if __name__ == "__main__":
    sys.exit(main())
