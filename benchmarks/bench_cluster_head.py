"""Time of one training step of the cluster head: the I-Con loss against TEMI's PMI.

The same batch, head and optimiser for both (the defaults of ``beyond-icon cluster``: 10
linear heads, Adam); the step is forward, loss, backward and the optimiser update. Prints a
table of milliseconds per step and the I-Con / PMI ratio, for each batch size and K.

    python benchmarks/bench_cluster_head.py --data embeddings:PATH [--batch-sizes 256,4096]
        [--clusters 20,1000] [--divergence tv] [--neighbor-mix 0.75 --batch-neighbors 20]
        [--repeats 5] [--device cpu|cuda] [--json out.json]

``--neighbor-mix`` times the I-Con step with p spread over the batch's own k-NN (the standardised
features' Euclidean neighbours, as ``beyond-icon cluster`` builds them), the k-NN search included.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from beyond_icon import data as data_registry
from beyond_icon.methods import PMI, ClusterLoss
from beyond_icon.models import ClusterHead
from beyond_icon.neighbors import cached_neighbors
from beyond_icon.profiling import step_time
from beyond_icon.train import resolve_device


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="digits")
    parser.add_argument("--batch-sizes", default="256,4096")
    parser.add_argument("--clusters", default="20,1000")
    parser.add_argument("--divergence", default="tv")
    parser.add_argument("--n-heads", type=int, default=10)
    parser.add_argument("--neighbor-mix", type=float, default=0.0)
    parser.add_argument("--batch-neighbors", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    dataset = data_registry.load(args.data)
    x = np.asarray(dataset.x_train, dtype=np.float32).reshape(len(dataset.x_train), -1)
    neighbors, _ = cached_neighbors(x, 20, None, device=torch.device("cpu"), verbose=False)
    x_all, knn = torch.as_tensor(x).to(device), torch.as_tensor(neighbors).to(device)
    rows = []
    print(f"{'batch':>6} {'K':>5} {'I-Con ms':>9} {'PMI ms':>8} {'ratio':>6}")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        anchors = torch.randperm(len(x))[:batch].to(device)
        partners = knn[anchors, torch.randint(0, 20, (len(anchors),)).to(device)]
        index = torch.cat([anchors, partners])
        xb = x_all[index]
        features = (xb - x_all.mean(0)) / x_all.std(0).clamp_min(1e-12)
        for k in (int(c) for c in args.clusters.split(",")):
            times = {}
            for name in ("icon", "pmi"):
                torch.manual_seed(0)
                head = ClusterHead(x.shape[1], k, args.n_heads).to(device)
                optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
                icon = ClusterLoss(
                    args.divergence,
                    neighbor_mix=args.neighbor_mix,
                    n_neighbors=args.batch_neighbors,
                )
                pmi = [PMI(k).to(device) for _ in range(args.n_heads)]

                def step(
                    name=name, head=head, optimizer=optimizer, icon=icon, pmi=pmi, xb=xb, f=features
                ):
                    logits = head(xb)
                    if name == "icon":
                        pair = torch.arange(len(xb) // 2, device=device).repeat(2)
                        graph = f if args.neighbor_mix > 0 else None
                        loss = icon(logits, pair, features=graph).mean()
                    else:
                        loss = torch.stack(
                            [
                                p(logits[h, : len(xb) // 2], logits[h, len(xb) // 2 :])
                                for h, p in enumerate(pmi)
                            ]
                        ).mean()
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()

                times[name] = step_time(step, args.repeats, device)
            ratio = times["icon"] / times["pmi"]
            rows.append(
                {"batch": batch, "k": k, "icon_s": times["icon"], "pmi_s": times["pmi"]}
                | {"ratio": ratio}
            )
            print(
                f"{batch:>6} {k:>5} {1e3 * times['icon']:>9.1f} {1e3 * times['pmi']:>8.1f} "
                f"{ratio:>6.2f}",
                flush=True,
            )
    result = {"data": args.data, "divergence": args.divergence, "n_heads": args.n_heads}
    result["device"] = str(device)
    result |= {"neighbor_mix": args.neighbor_mix, "batch_neighbors": args.batch_neighbors}
    result["rows"] = rows
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
