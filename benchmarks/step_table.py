"""One multi-task training step (forward + backward, no optimizer), peers side by side, for an MLP
and a CNN trunk of >= 1M parameters, and for transformer trunks (``--models encoder,gpt2``: a
2-layer ``nn.TransformerEncoder`` and a GPT-2-shaped Hugging Face decoder, d = 128, 32 tokens; see
:func:`transformer_trunk`) at T = 2, 8, 40.

Columns: median ms per step over ``--repeats`` steps after one warm-up step, and the peak resident
memory the step adds. Each (model, T, method) runs in a fresh process with glibc's mmap threshold
fixed at 128 KiB (``MALLOC_MMAP_THRESHOLD_``), so every tensor larger than that is mapped on
allocation and unmapped on free, and the resident set follows the tensors alive. The process resets
its peak (``/proc/self/clear_refs``, 5) after the warm-up and after dropping every ``.grad`` (as
``zero_grad(set_to_none=True)``), runs one step and reads ``VmHWM``: the step's peak minus
``VmRSS`` before it, i.e. everything the step allocates at its peak (activations, the graph and
the new ``.grad`` tensors included). "extra" subtracts the floor's figure at the same T: what a method holds
beyond the forward and T plain backward passes.

Methods:
* ``dense``: dense MTL, one backward of ``sum_t L_t``.
* ``floor``: the forward and T ``autograd.grad`` calls of every trainable parameter (the cost
  every method with exact per-task gradients pays); gradients dropped.
* ``fsmtl-seq`` / ``fsmtl-batched`` / ``fsmtl-auto``: :func:`fsmtl.masked_multitask_backward`
  with the masks over the whole trunk, ``batched=False/True/"auto"``.
* ``partial-top2``: masks over the top 2 of the trunk's 6 layers (the top block of a transformer;
  dense layers below, one backward through them via the boundary), ``batched="auto"``.
* ``mask-forward``: Eq. 3, each task's forward on ``S_t * theta`` followed by its backward,
  streamed into the masked sum (:class:`fsmtl.MaskedBackwardStream`), as the Trainer runs it.
* ``mask-forward-loop``: its baseline, T separate forward/backward passes on ``S_t * theta``
  (float masked weights), the gradients summed by hand.
* ``torchjd-mgda`` / ``torchjd-upgrad``: the Jacobian of the trunk, aggregated by torchjd.
* ``libmtl-loop``: LibMTL's way: per task ``backward(retain_graph=True)``, the flattened trunk
  gradient copied into a ``[T, P]`` buffer, then the masked combination by hand.

Run: ``OMP_WAIT_POLICY=PASSIVE taskset -c 1 python benchmarks/step_table.py`` (one thread), or
``python benchmarks/step_table.py --device cuda --repeats 20`` on a GPU (the same table; memory is
then the CUDA caching allocator's peak over what was allocated before the step).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

METHODS = (
    "dense",
    "floor",
    "fsmtl-seq",
    "fsmtl-batched",
    "fsmtl-auto",
    "partial-top2",
    "mask-forward",
    "mask-forward-loop",
    "torchjd-mgda",
    "torchjd-upgrad",
    "libmtl-loop",
)
KEEP = 0.3


SEQ_LEN, VOCAB, WIDTH = 32, 1000, 128


def transformer_trunk(model_name: str):
    """``encoder``: ``nn.Embedding`` + 2 ``nn.TransformerEncoderLayer`` (d 128, 4 heads, feed-forward
    512, batch_first, dropout 0), mean over positions; ``gpt2``: Hugging Face ``GPT2Model`` built
    from its config (2 layers, d 128, 4 heads, vocabulary 1000), last position's features. The top
    block of each is what ``partial-top2`` masks."""
    from torch import nn

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(VOCAB, WIDTH)
            layer = nn.TransformerEncoderLayer(WIDTH, 4, 4 * WIDTH, dropout=0.0, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

        def forward(self, tokens):
            return self.enc(self.emb(tokens)).mean(1)

    if model_name == "encoder":
        return Encoder(), ["enc.layers.1"]
    import transformers

    from fsmtl.models import HFTrunk

    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=WIDTH, n_layer=2, n_head=4, n_positions=SEQ_LEN, bos_token_id=0, eos_token_id=0
    )
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        setattr(config, key, 0.0)
    return HFTrunk(transformers.GPT2Model(config), pooling="last"), ["model.h.1"]


def build(model_name: str, num_tasks: int, masked_modules=None):
    from torch import nn

    import fsmtl

    if model_name in ("encoder", "gpt2"):
        trunk, top = transformer_trunk(model_name)
        heads = [nn.Linear(WIDTH, 1) for _ in range(num_tasks)]
        return fsmtl.MultiTaskModel(trunk, heads, masked_modules=top if masked_modules == "top2" else None)
    if model_name == "mlp":
        width = 512
        layers = [nn.Linear(256, width), nn.ReLU()]
        for _ in range(5):
            layers += [nn.Linear(width, width), nn.ReLU()]
        trunk = nn.Sequential(*layers)
        top2 = ["8", "10"]
        feat = width
    else:
        chans = [3, 64, 128, 256, 256]
        layers = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        layers += [nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU()]
        trunk = nn.Sequential(*layers)
        top2 = ["14", "16"]
        feat = 256
    heads = [nn.Linear(feat, 1) for _ in range(num_tasks)]
    return fsmtl.MultiTaskModel(trunk, heads, masked_modules=top2 if masked_modules == "top2" else None)


def inputs(model_name: str, batch: int, num_tasks: int, device):
    import torch

    gen = torch.Generator().manual_seed(0)
    if model_name in ("encoder", "gpt2"):
        x = torch.randint(0, VOCAB, (batch, SEQ_LEN), generator=gen)
    elif model_name == "mlp":
        x = torch.randn(batch, 256, generator=gen)
    else:
        x = torch.randn(batch, 3, 32, 32, generator=gen)
    ys = [torch.randint(0, 2, (batch, 1), generator=gen).float().to(device) for _ in range(num_tasks)]
    return x.to(device), ys


def make_step(method: str, model_name: str, num_tasks: int, batch: int, device="cpu"):
    import torch

    import fsmtl
    import fsmtl_kernels as fk

    torch.manual_seed(0)
    model = build(model_name, num_tasks, "top2" if method == "partial-top2" else None).to(device)
    x, ys = inputs(model_name, batch, num_tasks, device)
    params = model.masked_parameters()
    gen = torch.Generator().manual_seed(1)
    scores = [torch.rand(num_tasks, *p.shape, generator=gen).to(device) for p in params]
    mask = fk.topk_mask_batched(scores, KEEP)
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    def losses(masks=None, record=None):
        if masks is None:
            f = model.features(x, record=record)
            return [bce(h(f), y) for h, y in zip(model.heads, ys)]
        return [bce(model(x, t, masks[t]), y) for t, y in enumerate(ys)]

    def zero():
        for p in model.parameters():
            p.grad = None

    if method == "dense":

        def step():
            zero()
            torch.stack(losses()).sum().backward()
    elif method == "floor":
        every = [p for p in model.parameters() if p.requires_grad]

        def step():
            zero()
            for loss in losses():
                torch.autograd.grad(loss, every, retain_graph=True, allow_unused=True)
    elif method in ("fsmtl-seq", "fsmtl-batched", "fsmtl-auto", "partial-top2"):
        batched = {"fsmtl-seq": False, "fsmtl-batched": True}.get(method, "auto")

        def step():
            zero()
            record = fsmtl.ForwardRecord()  # as a sparse strategy's record: with the Linear calls
            ls = losses(record=record)
            fsmtl.masked_multitask_backward(
                ls,
                model.masked_parameters(),
                mask,
                dense_params=model.dense_shared_parameters(),
                head_params=model.head_parameters(),
                batched=batched,
                record=record,
            )
    elif method == "mask-forward":
        strategy = fsmtl.RandomSparse(KEEP, mask_forward=True)
        from fsmtl.strategies import TrainingContext

        tasks = [fsmtl.Task(f"t{t}", "binary", 1) for t in range(num_tasks)]
        strategy.context = TrainingContext(model, tasks, None, None)
        strategy.set_mask(mask)
        masks = [strategy.forward_mask(t) for t in range(num_tasks)]

        def step():
            zero()
            # As the Trainer runs it: task t's masked forward, then its backward (graph freed),
            # before task t + 1's forward; the stream writes .grad at finish().
            with strategy.open_backward_stream() as stream, model.streamed_forwards():
                for t, y in enumerate(ys):
                    stream.backward(t, bce(model(x, t, masks[t]), y))
                stream.finish()
    elif method == "mask-forward-loop":
        every = model.masked_parameters()
        bools = mask.to_bool_stacked()

        def step():
            zero()
            acc = [torch.zeros_like(p) for p in every]
            for t, y in enumerate(ys):  # T separate masked forward/backward passes, summed by hand
                weights = {n: p * b[t] for n, p, b in zip(model.masked_parameter_names(), every, bools)}
                out = model.heads[t](torch.func.functional_call(model.trunk, weights, (x,)))
                for a, g in zip(acc, torch.autograd.grad(bce(out, y), every)):
                    a.add_(g)
            for p, a in zip(every, acc):
                p.grad = a.div_(num_tasks)
    elif method.startswith("torchjd"):
        from fsmtl.strategies import JacobianAggregation, TrainingContext

        strategy = JacobianAggregation(method.split("-")[1])
        strategy.context = TrainingContext(model, [None] * num_tasks, None, None)

        def step():
            zero()
            strategy.backward(losses())
    elif method == "libmtl-loop":
        shared = model.shared_parameters()
        bools = [m.reshape(num_tasks, -1) for m in mask.to_bool_stacked()]
        flat_mask = torch.cat(bools, dim=1)
        total = flat_mask.shape[1]

        def step():
            zero()
            ls = losses()
            grads = torch.zeros(num_tasks, total, device=device)  # LibMTL's grads[T, P]
            for t, loss in enumerate(ls):
                loss.backward(retain_graph=True)
                grads[t] = torch.cat([p.grad.reshape(-1) for p in shared])
                for p in shared:
                    p.grad = None
            combined = (grads * flat_mask).sum(0) / num_tasks
            offset = 0
            for p in shared:
                p.grad = combined[offset : offset + p.numel()].view_as(p).clone()
                offset += p.numel()
    else:
        raise ValueError(method)
    step.model = model
    return step, sum(p.numel() for p in model.shared_parameters()), max(p.numel() for p in model.shared_parameters())


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def worker(args) -> None:
    """Timing (``--method all``): every method's step built in this process, one warm-up each,
    then ``repeats`` rounds taking the methods in turn (so load changes hit them alike); medians.
    Memory (one ``--method``): one warm-up step, the peak reset, one measured step. On CUDA a step
    is timed to its completion (``torch.cuda.synchronize``) and its memory is the caching
    allocator's peak over the tensors alive before it (``max_memory_allocated``)."""
    import torch

    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    if args.method == "all":
        steps, errors = {}, {}
        for m in args.methods.split(","):
            try:
                steps[m] = make_step(m, args.model, args.tasks, args.batch, args.device)
                steps[m][0]()  # warm-up
            except Exception as exc:  # a peer that cannot run here: reported in its row
                steps.pop(m, None)
                errors[m] = f"{type(exc).__name__}: {exc}"
        times = {m: [] for m in steps}
        for _ in range(args.repeats):
            for m, (step, _, _) in steps.items():
                sync()
                start = time.perf_counter()
                step()
                sync()
                times[m].append(time.perf_counter() - start)
        info = next(iter(steps.values()))
        out = {"ms": {m: 1000 * statistics.median(t) for m, t in times.items()}, "P": info[1], "largest": info[2]}
        if cuda:  # the allocator counts each tensor exactly, so one process measures every method
            out["peak_mib"] = {m: cuda_peak_mib(step) for m, (step, _, _) in steps.items()}
        out["errors"] = errors
        print(json.dumps(out))
        return
    step, total, largest = make_step(args.method, args.model, args.tasks, args.batch, args.device)
    step()  # warm-up
    for p in step.model.parameters():  # as optimizer.zero_grad(set_to_none=True) before a step
        p.grad = None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_kib("VmRSS")
    step()
    peak_mib = (status_kib("VmHWM") - before) / 1024
    print(json.dumps({"peak_mib": peak_mib, "P": total, "largest": largest}))


def cuda_peak_mib(step) -> float:
    """The CUDA memory one step allocates at its peak, beyond what was allocated before it."""
    import torch

    for p in step.model.parameters():  # as optimizer.zero_grad(set_to_none=True) before a step
        p.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--tasks", default="2,8,40")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batch-t40-cnn", type=int, default=16, help="batch of the CNN at T = 40 (run time)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--model")
    parser.add_argument("--method")
    parser.add_argument("--out", default=None)
    args, _ = parser.parse_known_args()
    if args.worker:
        args.tasks = int(args.tasks)
        worker(args)
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS=str(args.threads))
    rows = []
    for model_name in args.models.split(","):
        for num_tasks in [int(t) for t in args.tasks.split(",")]:
            batch = args.batch_t40_cnn if (model_name == "cnn" and num_tasks >= 40) else args.batch
            methods = args.methods.split(",")
            base = [sys.executable, __file__, "--worker", "--model", model_name, "--tasks", str(num_tasks)]
            base += ["--batch", str(batch), "--repeats", str(args.repeats), "--threads", str(args.threads)]
            base += ["--device", args.device]
            results = {m: {} for m in methods}
            for method in methods if args.device == "cpu" else ():
                proc = subprocess.run([*base, "--method", method], capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    results[method]["error"] = proc.stderr.strip().splitlines()[-1]
                else:
                    results[method].update(json.loads(proc.stdout.strip().splitlines()[-1]))
            proc = subprocess.run(
                [*base, "--method", "all", "--methods", ",".join(m for m in methods if "error" not in results[m])],
                capture_output=True,
                text=True,
                env=env,
            )
            if proc.returncode != 0:
                raise SystemExit(proc.stderr)
            timing = json.loads(proc.stdout.strip().splitlines()[-1])
            with open("/proc/loadavg") as f:
                load = f.read().split()[0]
            for m, error in timing["errors"].items():
                results[m]["error"] = error
            for m, ms in timing["ms"].items():
                results[m].update(ms=ms, load=load, P=timing["P"], largest=timing["largest"])
                if "peak_mib" in timing:
                    results[m]["peak_mib"] = timing["peak_mib"][m]
            print(model_name, num_tasks, batch, json.dumps(results), flush=True)
            rows.append({"model": model_name, "T": num_tasks, "batch": batch, "results": results})
    print(table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


def table(rows) -> str:
    lines = []
    for row in rows:
        res = row["results"]
        floor = res.get("floor", {})
        info = next((r for r in res.values() if "P" in r), {})
        bound = (info.get("P", 0) + row["T"] * info.get("largest", 0)) * 4 / 2**20
        lines.append(
            f"\n{row['model']} (P = {info.get('P')}, largest {info.get('largest')}), T = {row['T']}, batch "
            f"{row['batch']}: bound P + T x largest = {bound:.0f} MiB"
        )
        lines.append("| method | ms | / floor | / dense | peak MiB | extra over floor MiB | load |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        for name, r in res.items():
            if "error" in r:
                lines.append(f"| {name} | error: {r['error'][:80]} | | | | | |")
                continue
            ratio = r["ms"] / floor["ms"] if "ms" in floor else float("nan")
            dense = r["ms"] / res["dense"]["ms"] if "ms" in res.get("dense", {}) else float("nan")
            extra = r["peak_mib"] - floor["peak_mib"] if "peak_mib" in floor else float("nan")
            cells = [name, f"{r['ms']:.1f}", f"{ratio:.2f}", f"{dense:.2f}", f"{r['peak_mib']:.0f}", f"{extra:.0f}"]
            lines.append("| " + " | ".join(cells) + f" | {r['load']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
