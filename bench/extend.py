"""Extend a multi-GB sharded checkpoint: `dprope extend` vs `cp -r` of the same directory, same run.

    python bench/extend.py [--repeats 3] [--shape 1b|3b|7b]

The checkpoint is a Llama-shaped model of random bf16 tensors (--shape 1b: Llama-3.2-1B, 2.35 GB in 5 shards;
3b and 7b for larger ones; cached under bench/.data).  Two regimes, each command run --repeats times,
alternating, median reported:
  cold: the source evicted from the page cache before every run (a checkpoint not read recently);
  warm: the source in the page cache (the copy is then a memory copy, and fixed start-up costs show).
Targets: wall time <= 1.2x the copy, peak RSS < 500 MB.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import DATA, big_llama, dir_size, evict, measure, median_of  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shape", choices=["1b", "3b", "7b"], default="1b",
                    help="checkpoint size: Llama-3.2-1B (2.35 GB), -3B (6.4 GB) or Llama-2-7B (13.2 GB) shapes")
    args = ap.parse_args()
    src = big_llama(args.shape)
    size_gb = dir_size(src) / 1e9
    dprope = str(Path(sys.executable).with_name("dprope"))
    cp_out, ours_out = DATA / "cp-out", DATA / "extend-out"
    print(f"checkpoint: {src} ({size_gb:.2f} GB, {len(list(src.glob('*.safetensors')))} shards), "
          f"median of {args.repeats}")
    print(f"{'regime':>6} {'command':>14} {'wall s':>8} {'peak RSS MB':>12}")
    ok = True
    for regime in ("cold", "warm"):
        cps, ours = [], []
        for _ in range(args.repeats):
            for runs, out, cmd in ((cps, cp_out, ["cp", "-r", str(src), str(cp_out)]),
                                   (ours, ours_out, [dprope, "extend", str(src), str(ours_out),
                                                     "--target-length", "32768"])):
                shutil.rmtree(out, ignore_errors=True)
                if regime == "cold":
                    evict(src)
                else:
                    os.sync()
                    measure(["cat", *map(str, sorted(src.iterdir()))])  # read into the page cache
                runs.append(measure(cmd))
                shutil.rmtree(out, ignore_errors=True)
        c, o = median_of(cps), median_of(ours)
        ratio = o["wall_s"] / c["wall_s"]
        print(f"{regime:>6} {'cp -r':>14} {c['wall_s']:>8.2f} {c['peak_rss_mb']:>12.0f}")
        print(f"{regime:>6} {'dprope extend':>14} {o['wall_s']:>8.2f} {o['peak_rss_mb']:>12.0f}")
        met_t, met_m = ratio <= 1.2, o["peak_rss_mb"] < 500
        print(f"{regime:>6} ratio ours / cp: {ratio:.2f}x (target <= 1.2x: {'met' if met_t else 'MISSED'}); "
              f"peak RSS {o['peak_rss_mb']:.0f} MB (target < 500 MB: {'met' if met_m else 'MISSED'})")
        ok = ok and met_t and met_m
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
