"""One run on both cores: two single-thread data-parallel processes (torch.distributed,
gloo) against one process with two threads.

    python bench/two_cores.py                       # about 3 minutes
    python bench/two_cores.py --preset small --batch-size 64 --seconds 40 \\
        --recipe "--optimizer adamw --lr 0.003"

A sweep runs two trials at once, one thread each; a long run of one design has both cores
to itself, and there are two ways to use them:

* `two threads`: one process, torch's two intra-op threads, batch B;
* `ddp 2x1`: two processes of one thread each, DistributedDataParallel over gloo on
  loopback, batch B/2 each (the same global batch, so the same samples per update; batch
  norm's statistics are per process, B/2 pairs, since SyncBatchNorm needs CUDA);
* `two runs` (the ceiling, not one run): two independent one-thread runs at batch B, the
  sweep's way; their total samples/s.

Each way trains sweep/train.py's own step (fresh random pairs, the recipe's optimizer,
bf16 autocast where the CPU has it) for --seconds after a warm-up, --rounds times,
interleaved; samples/s is the median over rounds of the total over processes. After each
data-parallel round both ranks' weights are compared (all_gather): equal, or the bench
fails. The last line, `two_cores: ddp/threads=X`, is the ratio of the first two.
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

if __package__ in (None, ""):  # run as a script from a plain checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.time_to_quality import configs
from bench.train_throughput import describe_machine
from data.mixture import load_sources
from data.sources import DataError
from model.unet import PRESETS, ConfigError
from sweep.recipe import make_step_fn
from sweep.train import build_trial

WARM_UP_STEPS = 10


def train_for(rank: int, args: argparse.Namespace, batch_size: int, threads: int,
              store: str | None, results) -> None:
    """One process: train for args.seconds; put (rank, samples, seconds, whether the
    ranks' weights agree) on results.
    With a store (the pair's rendezvous), one of a data-parallel pair: every step goes on
    while rank 0's clock says so (both ranks must take the same number of steps, or one
    waits forever)."""
    torch.set_num_threads(threads)
    model_cfg, cfg = configs(args.preset, args.model, args.recipe)
    cfg = replace(cfg, batch_size=batch_size, seed=cfg.seed + rank, threads=0)
    fast = cfg.fast_path()
    sources = load_sources(fast.device)
    trial = build_trial(model_cfg, cfg, fast)
    if store:
        dist.init_process_group("gloo", init_method=store, rank=rank, world_size=2)
        # DDP copies rank 0's weights to rank 1 and averages gradients in backward.
        trial.model = torch.nn.parallel.DistributedDataParallel(trial.model)
    trial.model.train()
    step = make_step_fn(trial, sources.train, model_cfg, cfg, fast)
    for _ in range(WARM_UP_STEPS):
        step()
    steps, start = 0, time.perf_counter()
    while going(time.perf_counter() - start < args.seconds, bool(store)):
        loss = step()
        steps += 1
    loss.item()
    seconds = time.perf_counter() - start
    results.put((rank, steps * batch_size, seconds, not store or same_weights(trial.model)))
    if store:
        dist.destroy_process_group()
        # Freeing the DDP model frees its gloo process group, whose destructor joins gloo's
        # worker thread while holding the GIL; that thread may still need the GIL to free
        # its last work's tensors: now and then a deadlock at exit, and the bench waited
        # for ever (pytorch/pytorch#56297). The result is out: leave without destructors.
        results.close()
        results.join_thread()
        os._exit(0)


def same_weights(model: torch.nn.Module) -> bool:
    """Whether both ranks hold the same weights: data-parallel training done right."""
    mine = torch.cat([p.detach().flatten().double() for p in model.parameters()])
    theirs = [torch.empty_like(mine) for _ in range(2)]
    dist.all_gather(theirs, mine)
    return torch.equal(theirs[0], theirs[1])


def going(mine: bool, distributed: bool) -> bool:
    if not distributed:
        return mine
    flag = torch.tensor([int(mine)])
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def run_way(way: str, args: argparse.Namespace) -> float:
    """Total samples/s over the way's processes."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as rendezvous:
        # The pair meets in a file, not on a TCP port: a free port picked here could be
        # taken by another process (a test's Ray, say) before rank 0 binds it.
        store = f"file://{rendezvous}/store"
        if way == "two threads":
            plan = [(0, args.batch_size, 2, None)]
        elif way == "ddp 2x1":
            plan = [(rank, args.batch_size // 2, 1, store) for rank in (0, 1)]
        else:  # two runs
            plan = [(rank, args.batch_size, 1, None) for rank in (0, 1)]
        procs = [ctx.Process(target=train_for, args=(rank, args, batch, threads, at, results))
                 for rank, batch, threads, at in plan]
        for p in procs:
            p.start()
        got = collect(results, procs, way)
    if not all(same for *_, same in got):
        raise RuntimeError(f"{way}: the two ranks' weights differ after training")
    if way == "two runs":  # independent clocks: each run's own rate
        return sum(samples / seconds for _, samples, seconds, _ in got)
    return sum(samples for _, samples, *_ in got) / max(seconds for _, _, seconds, _ in got)


def collect(results, procs: list, way: str) -> list[tuple]:
    """Each process's result, then each joined. One that dies first is an error at once,
    not a wait for ever (its data-parallel partner would wait too: it is killed)."""
    got = []
    while len(got) < len(procs):
        try:
            got.append(results.get(timeout=1))
        except queue.Empty:
            if failed := [p.exitcode for p in procs if p.exitcode not in (None, 0)]:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"{way}: a process failed (exit {failed[0]})") from None
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"{way}: a process failed (exit {p.exitcode})")
    return got


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--model", default="", help="model flags of train.py, e.g. "
                        "'--base-filters 16'")
    parser.add_argument("--recipe", default="",
                        help="train.py's recipe flags (default: today's, TrainConfig's)")
    parser.add_argument("--batch-size", type=int, default=64, help="the global batch")
    parser.add_argument("--seconds", type=float, default=30.0, help="per way per round")
    parser.add_argument("--rounds", type=int, default=2)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        _, cfg = configs(args.preset, args.model, args.recipe)
        print("\n".join(describe_machine(cfg.fast_path())))
        load_sources(torch.device("cpu"))  # fills the data cache once, before the children
        ways = ["two threads", "ddp 2x1", "two runs"]
        rates: dict[str, list[float]] = {way: [] for way in ways}
        for round_ in range(1, args.rounds + 1):
            for way in ways:
                rates[way].append(run_way(way, args))
                print(f"round {round_}: {way:12s} {rates[way][-1]:7.1f} samples/s", flush=True)
    except (ConfigError, DataError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    design = " ".join(x for x in (args.preset, args.model, args.recipe or "today's recipe") if x)
    print(f"\n{design}, global batch {args.batch_size}, {args.seconds:g} s x {args.rounds} "
          "rounds")
    median = {way: statistics.median(r) for way, r in rates.items()}
    for way in ways:
        ratio = median[way] / median["two threads"]
        print(f"  {way:12s} {median[way]:7.1f} samples/s  ({ratio:.2f}x two threads)")
    print(f"two_cores: ddp/threads={median['ddp 2x1'] / median['two threads']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
