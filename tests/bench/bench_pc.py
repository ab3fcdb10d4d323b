"""Step time and memory of the PC training algorithms vs a backprop step (BENCHMARKS.md).

Run (CPU, tiny):  python tests/bench/bench_pc.py
Run (one GPU):    python tests/bench/bench_pc.py --device cuda --n_layer 6 --n_embd 384 --block_size 256

For `bp` and each of `settle`, `pc`, `pc_fixed` (pc with fixed_predictions) and
`ipc` at T in --T (default 1 2 4 8), in one process on the same random batch:
the median wall time of one full training step (GPT.training_step, clip,
AdamW step, zero_grad; CUDA synchronised before and after each step; bf16
autocast on CUDA, fp32 on CPU; no torch.compile for any row; all cases timed
round-robin, one step each per round, so drift in load hits all alike), its ratio to the
bp step, that ratio per (T+1) (the published reference for a well-optimised JAX
PC library is 0.5-0.6 x (T+1) bp steps per PC step), and memory:
- `saved MiB`: peak bytes of tensors held for backward (saved_tensors_hooks,
  each storage counted once; measured in one extra untimed step), on any device;
- `peak MiB`: torch.cuda.max_memory_allocated over the timed steps, model and
  optimizer state included (CUDA only).
Settling uses pc.state_lr (default 0.1) and no early stop, so every step runs T
settling steps. Progress goes to stderr; the Markdown table is printed last.
With --out FILE the rows are also written as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from model import GPTConfig, build_model  # noqa: E402


class SavedTensorPeak:
    """Peak bytes of storages held for backward while the context is active."""

    def __init__(self):
        self.live, self.peak, self.refs = 0, 0, {}

    def pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        key = (storage.data_ptr(), str(t.device))
        if key not in self.refs:
            self.refs[key] = 0
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self.refs[key] += 1
        return _Held(self, key, storage.nbytes(), t)

    @staticmethod
    def unpack(held: "_Held") -> torch.Tensor:
        return held.tensor

    def release(self, key, nbytes: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.live -= nbytes

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


class _Held:
    def __init__(self, tracker: SavedTensorPeak, key, nbytes: int, tensor: torch.Tensor):
        self.tracker, self.key, self.nbytes, self.tensor = tracker, key, nbytes, tensor

    def __del__(self):
        self.tracker.release(self.key, self.nbytes)


def make_model(args, algorithm: str, T: int, device: torch.device) -> GPT:
    pc = dict(algorithm="pc" if algorithm == "pc_fixed" else algorithm, settle_steps=T,
              state_lr=args.state_lr, fixed_predictions=algorithm == "pc_fixed")
    n_head = args.n_head or max(2, args.n_embd // 64)
    cfg = GPTConfig(vocab_size=args.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                    n_head=n_head, n_embd=args.n_embd, pc=pc)
    torch.manual_seed(0)
    return build_model(cfg).to(device)


class Case:
    """One (algorithm, T): its model, optimizer and one full training step."""

    def __init__(self, args, algorithm: str, T: int, batch, device: torch.device):
        self.algorithm, self.T, self.batch, self.device = algorithm, T, batch, device
        self.model = make_model(args, algorithm, T, device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=device.type == "cuda")
        self.amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
        self.times: list[float] = []

    def step(self) -> None:
        with self.amp:
            self.model.training_step(*self.batch, optimizer=self.opt)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def timed_step(self) -> None:
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        self.step()
        sync()
        self.times.append(time.perf_counter() - t0)


def memory(args, algorithm: str, T: int, batch, device: torch.device) -> dict:
    """Saved-for-backward peak and (CUDA) peak allocation of one step, this model alone resident."""
    case = Case(args, algorithm, T, batch, device)
    case.step()  # optimizer state exists from here on, as in training
    with SavedTensorPeak() as saved:
        case.step()
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        case.step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    del case
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(saved_mib=saved.peak / 2**20, peak_mib=peak)


def timings(cases: list[Case], warmup: int, steps: int) -> None:
    """Round-robin: every round times one step of every case, so load drift on a shared machine
    (or GPU clock changes) hits all cases alike and the ratios to bp stay fair."""
    for case in cases:
        for _ in range(warmup):
            case.step()
    for _ in range(steps):
        for case in cases:
            case.timed_step()


def table(rows: list[dict]) -> str:
    bp = rows[0]["ms"]
    lines = ["| algorithm | T | ms/step | x bp | x bp / (T+1) | saved MiB | peak MiB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = r["ms"] / bp
        per = "" if r["algorithm"] == "bp" else f"{ratio / (r['T'] + 1):.2f}"
        peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        lines.append(f"| {r['algorithm']} | {r['T']} | {r['ms']:.1f} | {ratio:.2f} | {per} | "
                     f"{r['saved_mib']:.1f} | {peak} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:<n>")
    p.add_argument("--n_layer", type=int, default=2)
    p.add_argument("--n_embd", type=int, default=64)
    p.add_argument("--n_head", type=int, default=0, help="0: n_embd/64, at least 2")
    p.add_argument("--block_size", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=0, help="0: 64 on CUDA, 8 on CPU")
    p.add_argument("--vocab_size", type=int, default=2048)
    p.add_argument("--T", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--algorithms", nargs="+", default=["settle", "pc", "pc_fixed", "ipc"],
                   choices=["settle", "pc", "pc_fixed", "ipc"])
    p.add_argument("--state_lr", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed rounds (one step of every case each)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.batch_size = args.batch_size or (64 if device.type == "cuda" else 8)
    g = torch.Generator().manual_seed(0)
    shape = (args.batch_size, args.block_size)
    batch = (torch.randint(0, args.vocab_size, shape, generator=g).to(device),
             torch.randint(0, args.vocab_size, shape, generator=g).to(device))
    specs = [("bp", 0)] + [(a, T) for a in args.algorithms for T in args.T]
    rows = []
    for algorithm, T in specs:
        rows.append(dict(algorithm=algorithm, T=T, **memory(args, algorithm, T, batch, device)))
        print(f"memory {algorithm} T={T}: saved {rows[-1]['saved_mib']:.1f} MiB", file=sys.stderr, flush=True)
    cases = [Case(args, algorithm, T, batch, device) for algorithm, T in specs]
    print(f"timing {len(cases)} cases x {args.steps} rounds ...", file=sys.stderr, flush=True)
    timings(cases, args.warmup, args.steps)
    for row, case in zip(rows, cases):
        row["ms"] = 1e3 * statistics.median(case.times)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    if args.out:
        args.out.write_text(json.dumps(dict(device=name, args={k: str(v) for k, v in vars(args).items()},
                                            rows=rows), indent=2))
    print(f"\n{name}, torch {torch.__version__}, n_layer={args.n_layer} n_embd={args.n_embd} "
          f"block_size={args.block_size} batch={args.batch_size} vocab={args.vocab_size}, "
          f"median of {args.steps} steps\n")
    print(table(rows))


if __name__ == "__main__":
    main()
