"""One rank of the gloo side of bench-allreduce: torch.distributed with the gloo backend.

The benchmark starts N of these (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment)
and reads the same lines from each as from our ranks: `TIME <mib> <seconds>` per buffer size
(mean of the timed all-reduces after warm-up and a barrier) and `RSS <kib>` last. The first
warm-up all-reduce checks the sum, as ours does.

    python gloo_allreduce.py --plan 4:2:30,64:2:30 [--timeout-secs 120]
"""

import argparse
import datetime
import resource
import sys
import time

import torch
import torch.distributed as dist


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--plan", required=True, help="mib:warmup:iters,...")
    ap.add_argument("--timeout-secs", type=int, default=120)
    args = ap.parse_args()
    plan = [tuple(int(x) for x in item.split(":")) for item in args.plan.split(",")]

    dist.init_process_group(
        "gloo", init_method="env://", timeout=datetime.timedelta(seconds=args.timeout_secs)
    )
    rank, world = dist.get_rank(), dist.get_world_size()
    for mib, warmup, iters in plan:
        data = torch.full(((mib << 20) // 4,), float(rank + 1), dtype=torch.float32)
        dist.all_reduce(data)
        want = float(world * (world + 1) // 2)
        if not bool((data == want).all()):
            print(f"wrong sum at {mib} MiB: got {data[:4].tolist()}..., want {want}", file=sys.stderr)
            sys.exit(1)
        for _ in range(1, warmup):
            dist.all_reduce(data)
        dist.barrier()
        started = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(data)
        print(f"TIME {mib} {(time.perf_counter() - started) / iters:.9f}", flush=True)
        del data
    print(f"RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
