"""Benchmark: streaming HNC conversion (write_pair_shards) against json.load of the same file.

Builds an HNC train-shaped file of ``--size-gb`` (records in HNC's real train/val shape: ``captions``
wrapper, ``cpt_p_id`` links, bboxes …), then measures, each in its own subprocess, wall time (MB/s) and
peak RSS (``os.wait4``'s per-child rusage) of

* ``write_pair_shards`` (ijson over the top-level keys → zstd Parquet shards),
* ``ijson.kvitems`` alone (the parser's own ceiling on this machine, for context), and
* ``json.load`` of the same file (what a naive reader would do; run under an address-space limit so
  it fails with MemoryError instead of pushing the machine into swap/OOM).

Seconds are wall time inside each child around the work itself (interpreter start-up and imports
excluded); CPU seconds (user + sys) and peak RSS cover the whole child. On a shared machine the CPU
figures are the steadier comparison: wall time also counts waiting for a core.

Targets: peak RSS <= 1.5 GB whatever the input size, >= 30 MB/s.

    python bench/preprocess.py --size-gb 1.0 --workdir /tmp/hnc-bench
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_PEAK_RSS_GB = 1.5
TARGET_MB_PER_S = 30.0

# Vocabulary for realistic GQA-like captions.
OBJECTS = ["plate", "straw", "table", "chair", "man", "woman", "dog", "cat", "car", "tree", "window",
           "shirt", "bag", "cup", "bottle", "sign", "building", "horse", "bench", "umbrella"]
COLOURS = ["yellow", "red", "white", "black", "blue", "green", "brown", "gray", "wooden", "large", "small"]
RELATIONS = ["to the left of", "to the right of", "on top of", "behind", "in front of", "near", "under"]
TRAIN_TYPES = ["attribute", "object", "attribute_subg", "relation_subj", "relation_obj", "relation_pred",
               "relation_attr_subj", "relation_attr_obj", "relation_attr_pred", "obj_count", "obj_comp_count",
               "obj_verify_count", "obj_verify_count_attr", "and_logic_attr", "and_logic_rel",
               "xor_logic_attr", "xor_logic_rel"]


def realistic_record(rng: random.Random, caption: str, label: int, type_name: str, link: int | None) -> dict:
    """One caption record in HNC's train/val shape (~500 bytes, like the real file's average)."""
    subject, obj = rng.sample(OBJECTS, 2)
    bboxes = {
        str(rng.randrange(10**6, 10**7)): {
            "bbox": {"x": rng.randrange(500), "y": rng.randrange(375), "w": rng.randrange(1, 300),
                     "h": rng.randrange(1, 300)},
            "name": name,
        }
        for name in (subject, obj)
    }
    return {
        "caption": caption,
        "label": label,
        "type": type_name,
        "textual_label": obj,
        "bboxes": bboxes,
        "ambiguity": {"subj": [subject], "obj": [obj], "is_ambiguous": False},
        "noisy": None,
        "replaced": [obj, subject],
        "cpt_p_id": link,
    }


def realistic_image_captions(rng: random.Random, n_pairs: int) -> dict:
    """The ``captions`` dict of one image: n_pairs (positive, negative), with the real file's defects
    (a few identical and a few duplicated pairs) so the cleaning path is exercised."""
    captions: dict[str, dict] = {}
    for i in range(n_pairs):
        a, b = rng.sample(COLOURS, 2)
        s, o = rng.sample(OBJECTS, 2)
        rel = rng.choice(RELATIONS)
        type_name = rng.choice(TRAIN_TYPES)
        positive = f"The {a} {s} is {rel} the {o}."
        negative = f"The {b} {s} is {rel} the {o}."
        roll = rng.random()
        if roll < 0.005:
            negative = positive.lower() + " "  # identical after strip + lower
        elif roll < 0.01 and i:
            positive, negative = captions[str(2 * i - 2)]["caption"], captions[str(2 * i - 1)]["caption"]
        pid, nid = 2 * i, 2 * i + 1
        captions[str(pid)] = realistic_record(rng, positive, 1, type_name, None)
        captions[str(nid)] = realistic_record(rng, negative, 0, type_name, pid)
    return captions


def synthetic_world_entries(workdir: Path) -> list[str]:
    """Serialized ``{"captions": …}`` entries of a small synthetic world's hnc_clean_strict_train.json."""
    import ijson
    from hnclip.synth import WorldConfig, write_world  # another helper's module: only needed for --records synth

    world = workdir / "world"
    write_world(world, WorldConfig(n_train=200, n_val=10, n_test=10, n_vqa_train=1, n_vqa_val=1,
                                   n_textvqa_train=1, n_textvqa_val=1, zeroshot_per_class=1, image_size=32))
    with open(world / "hnc" / "hnc_clean_strict_train.json", "rb") as handle:
        entries = [json.dumps(value) for _, value in ijson.kvitems(handle, "", use_float=True)]
    shutil.rmtree(world)
    return entries


def entry_pool(records: str, workdir: Path, seed: int = 0, n_entries: int = 64,
               pairs_per_image: int = 121) -> list[str]:
    """Serialized image entries to repeat under new ids.

    ``realistic``: our own records at real HNC's density (~121 pairs per image, ~500 bytes per caption
    record); ``synth``: the synthetic world's records (fewer, shorter captions per image).
    """
    if records == "synth":
        return synthetic_world_entries(workdir)
    rng = random.Random(seed)
    return [json.dumps({"captions": realistic_image_captions(rng, pairs_per_image)}) for _ in range(n_entries)]


def write_hnc_train_file(path: Path, size_bytes: int, pool: list[str]) -> int:
    """Write an HNC train-shaped JSON object of at least ``size_bytes`` by repeating ``pool``'s entries under
    new image ids; returns the number of images."""
    n_images, written = 0, 0
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("{")
        while written < size_bytes:
            entry = pool[n_images % len(pool)]
            chunk = ("" if n_images == 0 else ", ") + f'"{2_300_000 + n_images}": ' + entry
            handle.write(chunk)
            written += len(chunk)
            n_images += 1
        handle.write("}")
    return n_images


CONVERT_CODE = """
import json, sys, time
from hnclip.data.hnc import write_pair_shards
start = time.perf_counter()
stats = write_pair_shards(sys.argv[1], sys.argv[2], n_shards=int(sys.argv[3]), progress=False)
print(json.dumps({"seconds": time.perf_counter() - start, "pairs": stats["pairs"],
                  "dropped": stats["dropped"]}))
"""

PARSE_ONLY_CODE = """
import ijson, json, sys, time
start = time.perf_counter()
with open(sys.argv[1], "rb") as handle:
    n = sum(1 for _ in ijson.kvitems(handle, "", use_float=True, buf_size=1 << 20))
print(json.dumps({"seconds": time.perf_counter() - start, "images": n}))
"""

JSON_LOAD_CODE = """
import json, sys, time
start = time.perf_counter()
with open(sys.argv[1], "rb") as handle:
    data = json.load(handle)
print(json.dumps({"seconds": time.perf_counter() - start, "images": len(data)}))
"""


def available_memory_bytes() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def measure(code: str, args: list[str], memory_limit_bytes: int) -> dict:
    """Run ``code`` in a fresh interpreter: its own timing of the work, plus its peak RSS from ``wait4``
    (that child's own rusage; RUSAGE_CHILDREN would be the max over every child reaped so far)."""

    def limit_address_space() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit_bytes, memory_limit_bytes))

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=out, stderr=err,
                                preexec_fn=limit_address_space)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so tell Popen
        out.seek(0), err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    result = {
        "returncode": proc.returncode,
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # Linux reports KiB
        "cpu_seconds": usage.ru_utime + usage.ru_stime,  # whole child, imports included
    }
    if proc.returncode == 0:
        result.update(json.loads(stdout.strip().splitlines()[-1]))
    else:
        result["error"] = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {proc.returncode}"
    return result


def report_row(name: str, result: dict, size_mb: float) -> str:
    if result["returncode"] != 0:
        return f"{name:<20} failed: {result['error']} (peak RSS {result['peak_rss_bytes'] / 1e9:.2f} GB)"
    mb_per_s = size_mb / result["seconds"]
    return (f"{name:<20} {result['seconds']:>9.1f} {mb_per_s:>9.1f} {result['cpu_seconds']:>9.1f} "
            f"{size_mb / result['cpu_seconds']:>11.1f} {result['peak_rss_bytes'] / 1e9:>14.2f}")


def run_measurements(json_path: Path, shards_dir: Path, n_shards: int, with_json_load: bool) -> dict[str, dict]:
    # Keep json.load from taking the machine down: every child gets at most 70 % of what is free now.
    memory_limit = int(available_memory_bytes() * 0.7)
    print(f"subprocess address-space limit {memory_limit / 1e9:.1f} GB")
    results = {
        "write_pair_shards": measure(CONVERT_CODE, [str(json_path), str(shards_dir), str(n_shards)], memory_limit),
        "ijson parse only": measure(PARSE_ONLY_CODE, [str(json_path)], memory_limit),
    }
    if with_json_load:
        results["json.load"] = measure(JSON_LOAD_CODE, [str(json_path)], memory_limit)
    return results


def print_report(results: dict[str, dict], size_mb: float) -> bool:
    """The side-by-side table and the verdict on the targets; True when both are met."""
    print(f"\ninput {size_mb:,.0f} MB; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (shared)")
    print(f"{'method':<20} {'seconds':>9} {'MB/s':>9} {'CPU s':>9} {'MB/CPU-s':>11} {'peak RSS (GB)':>14}")
    for name, result in results.items():
        print(report_row(name, result, size_mb))
    convert = results["write_pair_shards"]
    if convert["returncode"] != 0:
        return False
    print(f"\npairs written: {convert['pairs']:,}; dropped: {convert['dropped']}")
    ok_rss = convert["peak_rss_bytes"] <= TARGET_PEAK_RSS_GB * 1e9
    ok_speed = size_mb / convert["seconds"] >= TARGET_MB_PER_S
    print(f"target peak RSS <= {TARGET_PEAK_RSS_GB} GB: {'met' if ok_rss else 'MISSED'}; "
          f"target >= {TARGET_MB_PER_S:.0f} MB/s: {'met' if ok_speed else 'MISSED'}")
    return ok_rss and ok_speed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="accepted for uniformity with other benches; unused")
    parser.add_argument("--size-gb", type=float, default=1.0, help="size of the generated HNC train file")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the file (default: a temp dir)")
    parser.add_argument("--n-shards", type=int, default=16)
    parser.add_argument("--records", choices=("realistic", "synth"), default="realistic",
                        help="realistic: generated at real HNC's density; synth: a small synthetic world's records")
    parser.add_argument("--keep", action="store_true", help="keep the generated file and shards")
    parser.add_argument("--skip-json-load", action="store_true", help="only measure the streaming conversion")
    args = parser.parse_args(argv)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="hnc-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    json_path, shards_dir = workdir / "hnc_bench_train.json", workdir / "shards"
    try:
        start = time.perf_counter()
        n_images = write_hnc_train_file(json_path, int(args.size_gb * 1e9), entry_pool(args.records, workdir))
        size_mb = json_path.stat().st_size / 1e6
        print(f"wrote {json_path} ({size_mb:,.0f} MB, {n_images:,} images) in {time.perf_counter() - start:.0f} s")
        results = run_measurements(json_path, shards_dir, args.n_shards, not args.skip_json_load)
        return 0 if print_report(results, size_mb) else 1
    finally:
        if not args.keep:
            json_path.unlink(missing_ok=True)
            shutil.rmtree(shards_dir, ignore_errors=True)
            if args.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
