"""The README's main job with and without compiled programs on disk: `flowsim sweep
examples/quickstart.toml` run in fresh processes with the compilation cache off, then twice
sharing a new cache directory (the first run fills it, the second loads from it).

    python scripts/sweep_cache.py [--config examples/quickstart.toml] [--out F.json]
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).parents[1]


def _run(config, cache, out):
    env = dict(os.environ, FLOWSIM_COMPILATION_CACHE=str(cache))
    tic = time.perf_counter()
    subprocess.run([sys.executable, "-m", "flowsim", "sweep", str(config), "--out", str(out),
                    "--quiet"], check=True, env=env, capture_output=True)
    return time.perf_counter() - tic


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=pathlib.Path, default=ROOT / "examples" / "quickstart.toml")
    p.add_argument("--out", type=pathlib.Path,
                   default=ROOT / "benchmarks" / "results" / "sweep_cache.json")
    args = p.parse_args()
    seconds = {}
    with tempfile.TemporaryDirectory() as work:
        work = pathlib.Path(work)
        for label, cache in (("cache_off", "off"), ("cold_cache", work / "cache"),
                             ("warm_cache", work / "cache")):
            seconds[label] = _run(args.config, cache, work / label)
            print(f"{label}: {seconds[label]:.1f} s")
        entries = sorted(q.name.split("-")[0] for q in (work / "cache").iterdir())
    import jax

    args.out.write_text(json.dumps({
        "command": f"flowsim sweep {args.config.relative_to(ROOT)} --quiet",
        "wall_s": seconds, "cache_entries": entries, "cpu_count": os.cpu_count(),
        "jax": jax.__version__}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
