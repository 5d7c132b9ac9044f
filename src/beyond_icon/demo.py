"""``beyond-icon demo``: the paper in miniature on the bundled digits, one report.

Three sweeps (clustering, supervised contrastive, parametric SNE) over KL, TV, JSD and
Hellinger with two seeds each, in ``OUT/cluster``, ``OUT/supcon`` and ``OUT/sne``; then
``OUT/report.md`` with the three tables and the figures. Finished runs are kept, so an
interrupted demo continues where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path

from beyond_icon import sweep

__all__ = ["DEMO", "run_demo"]

DIVERGENCES = ["kl", "tv", "jsd", "hellinger"]
SEEDS = [0, 1]

# (task, options, quick options, what the table measures)
DEMO = [
    (
        "cluster",
        {
            "data": "digits",
            "batch_size": 256,
            "n_neighbors": 20,
            "kmeans_init": 10,
        },
        {"n_steps": 20},
        "A linear cluster head on the standardised pixels of the digits train split, trained with the "
        "I-Con cluster loss (p: 1/4 on a partner among the 20 cosine nearest neighbours, 3/4 on the "
        "batch's own 20 nearest points; q: the cluster-sharing kernel); Hungarian accuracy, NMI "
        "and ARI of its clusters on the test split, with k-means on the same inputs as a row.",
    ),
    (
        "supcon",
        {
            "data": "digits",
            "backbone": "cnn",
            "metric": "euclidean",
            "epochs": 10,
            "batch_size": 256,
        },
        {"epochs": 1, "probe_epochs": 10},
        "Supervised contrastive training of the small CNN with two augmented views per image and the "
        "paper's Euclidean (Gaussian) kernel; linear-probe and 7-NN accuracy of the frozen features on "
        "the test split.",
    ),
    (
        "sne",
        {"data": "digits", "kernel": "gaussian"},
        {"n_steps": 20},
        "Parametric SNE with a Gaussian output kernel (the one that crowds), default recipe (p fitted "
        "once over the train split): 5-NN accuracy, trustworthiness and class silhouette of the 2-D "
        "test embedding, and the largest gradient norm of the first pass over the anchors over the "
        "median of all steps (KL's early spikes).",
    ),
]


def _set_aside(folder: Path, task: str, error: Exception, verbose: bool) -> None:
    """Move a demo task's folder whose runs were made under since-changed defaults (an older
    version's) to ``TASK.before-DATE-PID``: kept, not mixed into the new report. Refused while
    another process works on one of its runs."""
    with contextlib.ExitStack() as locks:  # a sweep busy in the folder keeps it in place
        for run in sorted((folder / "runs").glob("*/")):
            try:
                locks.enter_context(sweep.run_lock(run))
            except sweep.RunBusy:
                raise sweep.RunBusy(
                    f"{error} (and {run.name} is being run by another process: "
                    "rerun the demo once it has finished)"
                ) from None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = folder.with_name(f"{folder.name}.before-{stamp}-{os.getpid()}")
        folder.rename(aside)
    if verbose:
        print(f"{error}\n-> the earlier runs were moved to {aside}; starting {task} anew")


def run_demo(out: str | Path, quick: bool = False, verbose: bool = True, jobs: int = 1) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    sections, reused, total = [], 0, 0
    for task, options, quick_options, text in DEMO:
        config = sweep.config_class(task)(
            **{**options, **(quick_options if quick else {})}, device="cpu"
        )
        folder = out / task
        if verbose:
            print(f"\n== {task}: {', '.join(DIVERGENCES)} x seeds {SEEDS}")
        try:
            specs = sweep.plan(task, DIVERGENCES, SEEDS, dataclasses.asdict(config), folder)
        except sweep.SettingsChanged as error:
            if set(error.keys) & (set(options) | set(quick_options)):
                # the demo's own settings differ: --quick against a full demo's folder
                other = "a full demo's" if quick else "a --quick demo's"
                raise ValueError(
                    f"{folder} holds {other} runs ({', '.join(error.keys)} differ): give this "
                    f"demo another --out, or run it {'without' if quick else 'with'} --quick"
                ) from None
            _set_aside(folder, task, error, verbose)
            specs = sweep.plan(task, DIVERGENCES, SEEDS, dataclasses.asdict(config), folder)
        reused += sum(spec.finished for spec in specs)
        total += len(specs)
        failed = sweep.run_sweep(specs, jobs=jobs, verbose=verbose)
        if failed:
            raise RuntimeError(f"{len(failed)} {task} run(s) failed; rerun the demo to retry them")
        table = sweep.build_report(folder, verbose=False)
        figures = [f"{task}/{task}_bars.png"] + (
            ["sne/sne_embeddings.png", "sne/sne_grad_norm.png"] if task == "sne" else []
        )
        sections.append((task, text, table, figures))
    elapsed = time.perf_counter() - started
    lines = [
        "# beyond-icon demo: Beyond I-Con in miniature on digits",
        "",
        f"Three tasks x {len(DIVERGENCES)} divergences x {len(SEEDS)} seeds on the 1797 bundled "
        "8x8 digits (fixed 75/25 split). Each cell: mean ± std over seeds; best in bold.",
        f"{'Quick settings (a smoke test). ' if quick else ''}Wall time of this invocation: "
        f"{elapsed:.0f} s"
        + (f", {reused} of the {total} runs reused from an earlier one." if reused else "."),
        "",
    ]
    for task, text, table, figures in sections:
        lines += [f"## {task}", "", text, "", table, ""]
        lines += [f"![{Path(f).stem}]({f})" for f in figures] + [""]
    (out / "report.md").write_text("\n".join(lines))
    if verbose:
        for task, _, table, _ in sections:
            print(f"\n{task}\n{table}")
        print(f"\nreport: {out / 'report.md'} ({elapsed:.0f} s)")
    return out / "report.md"
