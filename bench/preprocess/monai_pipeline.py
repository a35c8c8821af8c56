#!/usr/bin/env python3
"""Time SuPreM's MONAI preprocessing, stage by stage, on BDMAP cases.

    python monai_pipeline.py DATA_DIR --cases N --threads T --json OUT.json
    python monai_pipeline.py DATA_DIR --cases N --threads 1 --procs 2 --json OUT.json

Stages per case (dictionary transforms, keys image/label, parameters as in
SuPreM's supervised_pretraining/dataset/dataloader_bdmap.py):

  read         read ct.nii.gz + segmentations/*.nii.gz bytes from disk
  decode       LoadImaged(image, dtype=int16, channel first) and
               LoadImaged(label = list of the class masks, dtype=uint8), which
               MONAI stacks into one (C, X, Y, Z) label volume
  orientation  Orientationd(axcodes="RAS")
  spacing      Spacingd(pixdim=(1.5,1.5,1.5), mode=("bilinear","nearest"))
  scale        ScaleIntensityRanged(a_min=-175, a_max=250, b_min=0, b_max=1, clip=True)
  crop_fg      CropForegroundd(source_key="image")
  pad          SpatialPadd(spatial_size=(96,96,96), mode="constant")
  rand_crop    RandCropByPosNegLabeld(spatial_size=(96,96,96), pos=2, neg=1,
               num_samples=1, image_key="image", image_threshold=0)

"decode" reads the files again through nibabel; after "read" they are in the
page cache, so "decode" is gunzip + parse + MONAI bookkeeping.  Use
--drop-caches to make "read" a cold read (needs root).

Threads: --threads T sets OMP/MKL/OpenBLAS/... env vars *before* numpy/torch
are imported, plus torch.set_num_threads(T) and set_num_interop_threads(T).
The per-stage CPU/wall ratio is recorded so you can check a 1-thread run really
stayed on one core.  --procs P runs cases in P worker processes (each with T
threads) and reports wall-clock throughput as well.
"""
import argparse
import json
import os
import sys
import time

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
              "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "BLIS_NUM_THREADS")
STAGES = ("read", "decode", "orientation", "spacing", "scale", "crop_fg", "pad", "rand_crop")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir")
    p.add_argument("--cases", type=int, required=True, help="use the first N BDMAP_* cases (sorted)")
    p.add_argument("--threads", type=int, default=1, help="threads per process (torch + OpenMP/BLAS)")
    p.add_argument("--procs", type=int, default=1, help="worker processes, cases are spread over them")
    p.add_argument("--all-cores", action="store_true",
                   help="shorthand: --threads <cores> --procs 1 unless --procs given, then threads=1")
    p.add_argument("--json", required=True, help="write results here")
    p.add_argument("--seed", type=int, default=0, help="RandCropByPosNegLabeld random state")
    p.add_argument("--classes", nargs="*", default=None,
                   help="mask names to stack (default: every segmentations/*.nii.gz, sorted)")
    p.add_argument("--drop-caches", action="store_true", help="echo 3 > /proc/sys/vm/drop_caches before each case")
    p.add_argument("--warmup", action="store_true",
                   help="run the first case once untimed first (excludes one-off init costs)")
    a = p.parse_args(argv)
    if a.all_cores:
        cores = os.cpu_count() or 1
        if a.procs > 1:
            a.threads = 1
        else:
            a.threads = cores
    return a


def set_thread_env(t):
    for k in THREAD_ENV:
        os.environ[k] = str(t)


# ---------------------------------------------------------------- worker side
_STATE = {}


def _init(threads, seed, drop_caches):
    """Import heavy modules after the thread env vars are set."""
    set_thread_env(threads)
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning, module="monai")  # Orientationd labels= notice
    import numpy as np
    import torch
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:
        pass  # already set in this process
    from monai.transforms import (LoadImaged, Orientationd, Spacingd, ScaleIntensityRanged,
                                  CropForegroundd, SpatialPadd, RandCropByPosNegLabeld)
    tf = {
        "load_image": LoadImaged(keys=["image"], dtype=np.int16, ensure_channel_first=True, image_only=True),
        "load_label": LoadImaged(keys=["label"], dtype=np.uint8, ensure_channel_first=True, image_only=True),
        "orientation": Orientationd(keys=["image", "label"], axcodes="RAS"),
        "spacing": Spacingd(keys=["image", "label"], pixdim=(1.5, 1.5, 1.5), mode=("bilinear", "nearest")),
        "scale": ScaleIntensityRanged(keys=["image"], a_min=-175, a_max=250, b_min=0.0, b_max=1.0, clip=True),
        "crop_fg": CropForegroundd(keys=["image", "label"], source_key="image"),
        "pad": SpatialPadd(keys=["image", "label"], spatial_size=(96, 96, 96), mode="constant"),
        "rand_crop": RandCropByPosNegLabeld(keys=["image", "label"], label_key="label",
                                            spatial_size=(96, 96, 96), pos=2, neg=1, num_samples=1,
                                            image_key="image", image_threshold=0),
    }
    tf["rand_crop"].set_random_state(seed)
    _STATE.update(tf=tf, torch=torch, np=np, drop_caches=drop_caches, threads=threads)


def _shape(d):
    return {k: list(d[k].shape) + [str(d[k].dtype).replace("torch.", "")] for k in ("image", "label")}


def run_case(case):
    """Run all stages on one case dict; returns timings and shapes."""
    tf, torch = _STATE["tf"], _STATE["torch"]
    if _STATE["drop_caches"]:
        os.sync()
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        except OSError as e:
            print(f"warning: cannot drop caches: {e}", file=sys.stderr)
    wall, cpu, shapes = {}, {}, {}

    def tick():
        return time.perf_counter(), time.process_time()

    def tock(name, t):
        w0, c0 = t
        wall[name] = time.perf_counter() - w0
        cpu[name] = time.process_time() - c0

    with torch.inference_mode(False), torch.no_grad():
        t = tick()
        nbytes = 0
        for path in [case["image"]] + case["label"]:
            with open(path, "rb") as f:
                nbytes += len(f.read())
        tock("read", t)

        t = tick()
        d = {"image": case["image"], "label": list(case["label"])}
        t_img = tick()
        d = tf["load_image"](d)
        tock("decode_image", t_img)
        t_lbl = tick()
        d = tf["load_label"](d)
        tock("decode_label", t_lbl)
        tock("decode", t)
        shapes["decode"] = _shape(d)

        for name in ("orientation", "spacing", "scale", "crop_fg", "pad"):
            t = tick()
            d = tf[name](d)
            tock(name, t)
            shapes[name] = _shape(d)

        t = tick()
        out = tf["rand_crop"](d)
        tock("rand_crop", t)
        shapes["rand_crop"] = _shape(out[0])

    import resource
    detail = {"wall_s": {k: wall.pop(k) for k in ("decode_image", "decode_label")},
              "cpu_s": {k: cpu.pop(k) for k in ("decode_image", "decode_label")}}
    return {
        "case": case["name"], "bytes_read": nbytes, "wall_s": wall, "cpu_s": cpu,
        "total_wall_s": sum(wall.values()), "total_cpu_s": sum(cpu.values()),
        "decode_detail": detail, "loadavg_after": os.getloadavg(),
        "shapes": shapes, "pid": os.getpid(),
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
    }


def _worker(args):
    threads, seed, drop_caches, case = args
    if not _STATE:
        _init(threads, seed, drop_caches)
    return run_case(case)


# ---------------------------------------------------------------- driver
def find_cases(data_dir, n, classes):
    names = sorted(x for x in os.listdir(data_dir) if x.startswith("BDMAP_"))[:n]
    if len(names) < n:
        sys.exit(f"only {len(names)} BDMAP_* cases in {data_dir}, asked for {n}")
    cases = []
    for name in names:
        seg = os.path.join(data_dir, name, "segmentations")
        cls = classes or sorted(f[:-len(".nii.gz")] for f in os.listdir(seg) if f.endswith(".nii.gz"))
        cases.append({"name": name, "image": os.path.join(data_dir, name, "ct.nii.gz"),
                      "label": [os.path.join(seg, c + ".nii.gz") for c in cls], "classes": cls})
    return cases


def summarize(results):
    n = len(results)
    mean = {s: sum(r["wall_s"][s] for r in results) / n for s in STAGES}
    mean_cpu = {s: sum(r["cpu_s"][s] for r in results) / n for s in STAGES}
    return {
        "mean_wall_s": mean,
        "mean_cpu_s": mean_cpu,
        "cpu_per_wall": {s: (mean_cpu[s] / mean[s] if mean[s] > 0 else None) for s in STAGES},
        "mean_total_wall_s": sum(mean.values()),
        "mean_total_cpu_s": sum(mean_cpu.values()),
    }


def main(argv=None):
    a = parse_args(argv)
    set_thread_env(a.threads)  # before anything imports numpy/torch
    cases = find_cases(a.data_dir, a.cases, a.classes)
    print(f"{len(cases)} cases, {len(cases[0]['label'])} label classes, "
          f"threads/proc={a.threads}, procs={a.procs}, cpu_count={os.cpu_count()}", flush=True)

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    if a.procs == 1:
        _init(a.threads, a.seed, a.drop_caches)
        if a.warmup:
            run_case(cases[0])
        t0 = time.perf_counter()
        results = []
        for c in cases:
            r = run_case(c)
            results.append(r)
            print_case(r)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(max_workers=a.procs, mp_context=ctx) as ex:
            if a.warmup:  # one warm-up per worker
                list(ex.map(_worker, [(a.threads, a.seed, a.drop_caches, cases[0])] * a.procs))
            t0 = time.perf_counter()
            results = []
            for r in ex.map(_worker, [(a.threads, a.seed, a.drop_caches, c) for c in cases]):
                results.append(r)
                print_case(r)
    wall_all = time.perf_counter() - t0

    import torch, monai, nibabel, numpy
    summ = summarize(results)
    out = {
        "config": {
            "data_dir": os.path.abspath(a.data_dir), "cases": len(cases), "threads_per_proc": a.threads,
            "procs": a.procs, "cpu_count": os.cpu_count(), "seed": a.seed, "drop_caches": a.drop_caches,
            "warmup": a.warmup, "classes": cases[0]["classes"],
            "env": {k: os.environ.get(k) for k in THREAD_ENV},
            "torch_num_threads_main": torch.get_num_threads(),
            "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                         "monai": monai.__version__, "nibabel": nibabel.__version__, "numpy": numpy.__version__},
        },
        "cases": results,
        "summary": summ,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "wall_all_cases_s": wall_all,
        "throughput_s_per_volume": wall_all / len(cases),
    }
    with open(a.json, "w") as f:
        json.dump(out, f, indent=2)

    print("\nmean seconds per volume (wall | cpu):")
    for s in STAGES:
        print(f"  {s:12s} {summ['mean_wall_s'][s]:8.3f} | {summ['mean_cpu_s'][s]:8.3f}")
    print(f"  {'TOTAL':12s} {summ['mean_total_wall_s']:8.3f} | {summ['mean_total_cpu_s']:8.3f}")
    print(f"throughput: {wall_all:.2f} s for {len(cases)} volumes = {out['throughput_s_per_volume']:.3f} s/volume "
          f"(threads/proc={a.threads}, procs={a.procs})")
    print(f"loadavg before/after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f} "
          f"(anything >~{a.procs * a.threads} means other work shared the cores; compare cpu columns)")
    print(f"wrote {a.json}")


def print_case(r):
    st = "  ".join(f"{s}={r['wall_s'][s]:.3f}" for s in STAGES)
    dd = r["decode_detail"]["wall_s"]
    st += f" (decode: image {dd['decode_image']:.3f} + label {dd['decode_label']:.3f})"
    print(f"{r['case']} [pid {r['pid']}]: total {r['total_wall_s']:.3f}s wall / {r['total_cpu_s']:.3f}s cpu"
          f" | {st} | maxrss {r['maxrss_mb']:.0f} MB", flush=True)


if __name__ == "__main__":
    main()
