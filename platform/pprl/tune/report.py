"""Results of a search under ``{storage}/{name}/``: trials.parquet, pareto.png, best.yaml, tune_report.md.

* ``trials.parquet``: one row per trial per reported epoch: the trial's parameters, every attack's figure and whether
  it meets its bar (pprl.tune.objective), the leak, the score, its status and whether ASHA stopped it early.
* ``pareto.png``: each trial's last report as a point (the worst attack's identity accuracy above chance on the x
  axis, lower = more private; expression accuracy on the y axis, higher = more useful), the audit's bars, the trials
  that pass all of them, the Pareto front, the base config's weights (the paper's for the paper presets).
* ``best.yaml``: the full config of the best-scoring trial among those that pass every bar of the audit;
  ``jobs/train.py --config best.yaml`` takes it as is. When no trial passes there is no ``best.yaml``: the best by
  score goes to ``best_failing.yaml``, headed by the bars it misses, and the driver logs them.
* ``tune_report.md``: the best trial and the whole Pareto front, with how they were measured.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pprl import storage
from pprl.tune.objective import ATTACKS, SCORE, bar, failed_bars
from pprl.tune.space import apply_params

log = logging.getLogger(__name__)

FIGURES = tuple(f"{name}_acc" for name in ATTACKS)  # expression_acc among them
PASSES = (*(f"{name}_pass" for name in ATTACKS), "audit_pass")
METRICS = ("training_iteration", "epoch", "step", *FIGURES, "identity_acc", "target_acc", "privacy_leak", *PASSES, SCORE,
           "collapsed", "judges_token", "eval_seconds", "time_total_s")  # fmt: skip
FILES = ("trials.parquet", "pareto.png", "best.yaml", "tune_report.md")
BEST_FAILING = "best_failing.yaml"  # instead of best.yaml when no trial passes the audit's bars


@dataclass
class SearchSummary:
    """What the report needs to know about the search (built by the driver from its job)."""

    run_uri: str
    base: dict[str, Any]  # base Config.to_dict()
    params: list[str]  # searched fields
    base_point: dict[str, Any] | None  # the base config's values of the searched fields, if it ran as a trial
    max_epochs: int
    num_samples: int  # trials the search will run in total
    num_identities: int
    num_expressions: int
    privacy_weight: float
    reference: dict[str, float]  # judges on original validation images
    settings: dict[str, Any] = field(default_factory=dict)  # shown in the report


@dataclass
class Outcome:
    trials: int
    finished: bool  # every trial TERMINATED or ERROR
    stopped_early: int
    errors: int
    best_trial: str | None  # the best-scoring trial that passes every bar; else (none passes) the best by score
    best_score: float | None
    best_failed: list[str]  # the bars best_trial misses ("name figure > bar"): empty when it passes the audit
    front: list[str]
    files: dict[str, str]


# --------------------------------------------------------------------------------------------------------- tables
def collect(analysis, summary: SearchSummary) -> pd.DataFrame:
    """One row per trial per epoch (an errored trial without reports keeps one row of empty metrics).

    A trial interrupted after reporting an epoch whose checkpoint was not yet saved re-runs that epoch when the
    search resumes: its new report replaces the interrupted one.
    """
    rows = []
    for trial in analysis.trials:
        info = {"trial_id": trial.trial_id, "status": trial.status, **{p: trial.config.get(p) for p in summary.params}}
        info["is_base"] = summary.base_point is not None and all(_same(trial.config.get(p), v) for p, v in summary.base_point.items())
        frame = analysis.trial_dataframes.get(trial.trial_id)
        if frame is None or frame.empty:
            rows.append(info)
            continue
        keep = [c for c in frame.columns if c in METRICS or c.startswith("train_")]
        rows.extend({**info, **record} for record in frame[keep].to_dict("records"))
    table = pd.DataFrame(rows)
    for column in METRICS:
        if column not in table:
            table[column] = np.nan
    reported = table["training_iteration"].notna()
    table = table[~(reported & table.duplicated(["trial_id", "training_iteration"], keep="last"))]
    last = table.groupby("trial_id")["training_iteration"].transform("max")
    table["stopped_early"] = (table["status"] == "TERMINATED") & (last < summary.max_epochs)
    return table.sort_values(["trial_id", "training_iteration"], kind="stable").reset_index(drop=True)


def final_rows(table: pd.DataFrame) -> pd.DataFrame:
    """Each trial's last report (trials with no report are left out)."""
    done = table.dropna(subset=[SCORE])
    return done.loc[done.groupby("trial_id")["training_iteration"].idxmax()].reset_index(drop=True)


def best_row(final: pd.DataFrame) -> pd.Series | None:
    """Highest score among the trials that pass every bar of the audit; when none passes, the highest of all (check
    ``audit_pass``). Ties go to the lower leak, then the higher expression accuracy."""
    if not len(final):
        return None
    order = final.sort_values([SCORE, "privacy_leak", "expression_acc"], ascending=[False, True, False], kind="stable")
    passing = order[order["audit_pass"].astype(bool)]
    return (passing if len(passing) else order).iloc[0]


def pareto_mask(leak: np.ndarray, expression_acc: np.ndarray) -> np.ndarray:
    """True where no other point is at least as private and as useful, and strictly better in one of them."""
    x, y = np.asarray(leak, float), np.asarray(expression_acc, float)
    mask = np.ones(len(x), bool)
    for i in range(len(x)):
        dominated = (x <= x[i]) & (y >= y[i]) & ((x < x[i]) | (y > y[i]))
        mask[i] = not dominated.any()
    return mask


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    return a == b


# --------------------------------------------------------------------------------------------------------- writing
def write_results(analysis, summary: SearchSummary) -> Outcome:
    table = collect(analysis, summary)
    final = final_rows(table)
    final["pareto"] = pareto_mask(final["privacy_leak"], final["expression_acc"]) if len(final) else []
    files = {name: storage.join(summary.run_uri, name) for name in FILES}
    storage.write_parquet(pa.Table.from_pandas(table, preserve_index=False), files["trials.parquet"])
    best = best_row(final)
    failed = [] if best is None else failed_bars(best, summary.num_identities)
    files.pop("best.yaml")
    if best is not None:
        files.update(write_best(analysis, best, failed, summary))
    storage.write_bytes(files["pareto.png"], plot_pareto(final, summary))
    statuses = table.drop_duplicates("trial_id")["status"]
    outcome = Outcome(
        trials=int(table["trial_id"].nunique()),
        finished=len(statuses) >= summary.num_samples and bool(statuses.isin(["TERMINATED", "ERROR"]).all()),
        stopped_early=int(table.drop_duplicates("trial_id")["stopped_early"].sum()),
        errors=int((statuses == "ERROR").sum()),
        best_trial=None if best is None else str(best["trial_id"]),
        best_score=None if best is None else float(best[SCORE]),
        best_failed=failed,
        front=final.loc[final["pareto"], "trial_id"].tolist() if len(final) else [],
        files=files,
    )
    storage.write_text(files["tune_report.md"], render_report(table, final, best, summary, outcome, analysis))
    return outcome


def write_best(analysis, best: pd.Series, failed: list[str], summary: SearchSummary) -> dict[str, str]:
    """``best.yaml`` (or, failing the audit, ``best_failing.yaml`` headed by the bars missed) and its sample grid."""
    config = apply_params(summary.base, {p: _plain(best[p]) for p in summary.params}).to_yaml()
    name = BEST_FAILING if failed else "best.yaml"
    if failed:
        log.warning("no trial passes the audit's bars; the best by score, trial %s, misses: %s (written to %s, no best.yaml)",
                    best["trial_id"], "; ".join(failed), BEST_FAILING)  # fmt: skip
        config = f"# trial {best['trial_id']} FAILS the privacy audit's bars: {'; '.join(failed)}\n{config}"
    files = {name: storage.join(summary.run_uri, name)}
    storage.write_text(files[name], config)
    samples = copy_samples(analysis, best["trial_id"], storage.join(summary.run_uri, "best_samples.png"))
    return files | ({"best_samples.png": samples} if samples else {})


def copy_samples(analysis, trial_id: str, uri: str) -> str | None:
    """The best trial's last sample grid (validation faces as every identity), next to the report."""
    trial = next(t for t in analysis.trials if t.trial_id == trial_id)
    checkpoint = trial.checkpoint
    if checkpoint is None:
        return None
    from pprl.tune.trial import SAMPLES_FILE

    try:
        with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{SAMPLES_FILE}") as f:
            storage.write_bytes(uri, f.readall())
    except (FileNotFoundError, OSError) as err:
        log.warning("no sample grid for trial %s: %s", trial_id, err)
        return None
    return uri


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


# --------------------------------------------------------------------------------------------------------- plot
def plot_pareto(final: pd.DataFrame, summary: SearchSummary) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 7), dpi=120)
    chance = 1 / summary.num_identities
    ax.axvline(0, color="0.6", ls="--", lw=1, label=f"identity chance 1/{summary.num_identities}")
    ax.axhline(1 / summary.num_expressions, color="0.6", ls=":", lw=1, label=f"expression chance 1/{summary.num_expressions}")
    for name, ls in (("latent_knn", "-."), ("output_knn", (0, (5, 2)))):
        kind = name.split("_")[0]
        ax.axvline(bar(name, summary.num_identities) - chance, color="tab:green", ls=ls, lw=1, label=f"bar of the {kind} attacks")
    ax.axhline(bar("expression", summary.num_identities), color="tab:green", ls=":", lw=1, label="bar of expression")
    if len(final):
        _plot_trials(ax, final, base_label(summary.base))
    ax.set_xlabel("worst attack's identity accuracy above chance (privacy leak, lower is better)")
    ax.set_ylabel("expression accuracy of the judge on anonymised images (utility, higher is better)")
    ax.set_xlim(-chance - 0.03, 1 - chance + 0.03)
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.set_title(f"{len(final)} trials (last report each); score = expression - {summary.privacy_weight:g} x leak+", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _plot_trials(ax, final: pd.DataFrame, base_name: str) -> None:
    early = final["stopped_early"].to_numpy(bool)
    x, y, score = (final[c].to_numpy(float) for c in ("privacy_leak", "expression_acc", SCORE))
    norm = matplotlib_norm(score)
    points = ax.scatter(x[~early], y[~early], c=score[~early], cmap="viridis", norm=norm, s=45, edgecolors="k", lw=0.3,
                        label="trial (all epochs)", zorder=3)
    ax.scatter(x[early], y[early], c=score[early], cmap="viridis", norm=norm, marker="v", s=45, edgecolors="k", lw=0.3,
               label="trial stopped early by ASHA", zorder=3)
    ax.figure.colorbar(points, ax=ax, label="score", shrink=0.8)
    passing = final["audit_pass"].to_numpy(bool)
    ax.scatter(x[passing], y[passing], marker="s", s=110, facecolors="none", edgecolors="tab:green", lw=1.5,
               label="passes every bar of the audit", zorder=4)
    front = final[final["pareto"]].sort_values("privacy_leak")
    # the front as a staircase: every point below and to the right of it is dominated
    fx = np.concatenate([[front["privacy_leak"].iloc[0]], np.repeat(front["privacy_leak"].to_numpy()[1:], 2), [1.03]])
    fy = np.repeat(front["expression_acc"].to_numpy(), 2)
    ax.plot(fx, fy, color="tab:red", lw=1.5, label="Pareto front", zorder=2)
    for _, row in front.iterrows():
        ax.annotate(str(row["trial_id"])[-5:], (row["privacy_leak"], row["expression_acc"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    base = final[final["is_base"]]
    if len(base):
        ax.scatter(base["privacy_leak"], base["expression_acc"], marker="*", s=280, color="tab:orange", edgecolors="k", label=base_name, zorder=4)
    best = best_row(final)
    label = "best passing trial (best.yaml)" if best["audit_pass"] else "best by score, fails the audit (best_failing.yaml)"
    ax.scatter([best["privacy_leak"]], [best["expression_acc"]], marker="o", s=170, facecolors="none", edgecolors="tab:red", lw=2,
               label=label, zorder=5)


def matplotlib_norm(values: np.ndarray):
    from matplotlib.colors import Normalize

    low, high = float(np.min(values)), float(np.max(values))
    return Normalize(low - 0.05, high + 0.05) if high - low < 1e-9 else Normalize(low, high)


def base_label(base: dict[str, Any]) -> str:
    """Name the base config's weights: the paper's, when its generator weights are a paper preset's."""
    from pprl.config import GENERATOR_WEIGHTS, Config, load_config

    loss = Config.from_dict(base).loss
    for preset, dataset in (("paper-ferg", "FERG"), ("paper-mug", "MUG")):
        paper = load_config(preset).loss
        if all(getattr(loss, w) == getattr(paper, w) for w in GENERATOR_WEIGHTS):
            return f"the paper's {dataset} weights (base config)"
    return "the base config's weights"


# --------------------------------------------------------------------------------------------------------- markdown
def render_report(table: pd.DataFrame, final: pd.DataFrame, best, summary: SearchSummary, outcome: Outcome, analysis) -> str:
    w, n_id = summary.privacy_weight, summary.num_identities
    lines = [f"# Loss-weight search `{summary.run_uri}`", ""]
    if not outcome.finished:
        done = int(table.drop_duplicates("trial_id")["status"].isin(["TERMINATED", "ERROR"]).sum())
        lines += [f"**Partial results**: {done} of {summary.num_samples} trials finished. Run the same command (same `--name`) to continue.", ""]
    lines += [
        f"{outcome.trials} trials, {outcome.stopped_early} stopped early by ASHA, {outcome.errors} failed. "
        f"Each trial reports after every epoch (at most {summary.max_epochs}); the tables use each trial's last report.",
        "",
        "## How trials are scored",
        "",
        "- Privacy: the attack suite's cosine kNN and logistic-regression probes, trained with the *source* identities on "
        "one half of the validation images and scored on the other, on the exported latent (`latent_knn`, `latent_linear`, "
        f"bar <= {bar('latent_knn', n_id):.3f}) and on the frozen identity judge's penultimate features of the anonymised "
        f"images (`output_knn`, `output_linear`, bar <= {bar('output_knn', n_id):.3f}). Chance = 1/{n_id} = {1 / n_id:.3f}.",
        "- Utility: `expression`, the frozen expression judge (trained on originals) on the anonymised images, "
        f"bar >= {bar('expression', n_id):.3f}.",
        "- `leak`: the worst privacy attack's accuracy above chance; the Pareto front trades it against expression.",
        f"- `score = expression - {w:g} * max(0, leak)`: ASHA ranks trials by it; `best.yaml` is the best-scoring trial "
        "that meets every bar.",
    ]
    if summary.reference:
        lines.append(
            f"- Judges on the original validation images (no anonymisation): identity {summary.reference['identity_acc']:.3f}, "
            f"expression {summary.reference['expression_acc']:.3f}."
        )
    lines += ["", "## Best trial", ""]
    if best is None:
        lines.append("No trial reported a result.")
    else:
        lines += _best_section(best, summary, analysis)
    lines += ["", "## Pareto front (lowest leak first)", ""]
    front = final[final["pareto"]].sort_values("privacy_leak") if len(final) else final
    lines += _table(front, summary.params)
    lines += ["", "## All trials", ""]
    lines += _table(final.sort_values(SCORE, ascending=False) if len(final) else final, summary.params)
    failed = table.drop_duplicates("trial_id")
    failed = failed[failed["status"] == "ERROR"]
    if len(failed):
        lines += ["", f"Failed trials: {', '.join(failed['trial_id'])} (see their `error.txt` under the run folder)."]
    lines += ["", "## Settings", "", "```yaml", *_settings_lines(summary.settings), "```", ""]
    return "\n".join(lines)


def _best_section(best, summary: SearchSummary, analysis) -> list[str]:
    trial = next(t for t in analysis.trials if t.trial_id == best["trial_id"])
    checkpoint = "none"
    if trial.checkpoint is not None:
        checkpoint = ("s3://" if storage.is_s3(summary.run_uri) else "") + trial.checkpoint.path
    params = ", ".join(f"`{p}={_fmt(best[p])}`" for p in summary.params)
    failed = failed_bars(best, summary.num_identities)
    figures = ", ".join(f"{name} {best[f'{name}_acc']:.3f}" for name in ATTACKS)
    file = BEST_FAILING if failed else "best.yaml"
    lines = [
        f"**No trial passes the audit's bars.** The best by score misses: {'; '.join(failed)}. Its config is written to "
        f"`{BEST_FAILING}`, and there is no `best.yaml`.\n" if failed else "The best-scoring trial that passes every bar.\n",
        f"Trial `{best['trial_id']}`: score {best[SCORE]:.3f}, leak {best['privacy_leak']:.3f} ({figures}; judge identity "
        f"{best['identity_acc']:.3f}, target {best['target_acc']:.3f}) after {int(best['training_iteration'])} epoch(s).",
        "",
        f"Weights: {params}.",
        "",
        f"Train it fully with `python jobs/train.py --config {file} --data ... --storage ... [--epochs N]` "
        f"(`{file}` is its complete config, including the search's epochs).",
        "",
        f"Its last checkpoint (trainer state): `{checkpoint}`.",
    ]
    if best.get("is_base"):
        lines += ["", "The best trial is the base config's own weights."]
    return lines


def _table(rows: pd.DataFrame, params: list[str]) -> list[str]:
    """One row per trial: its weights, every attack's figure (``FAIL`` where it misses its bar), leak, score, notes."""
    head = ["trial", *params, "epochs", *ATTACKS, "leak", SCORE, "audit", "note"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, row in rows.iterrows():
        note = ", ".join(n for n, flag in (("base weights", row.get("is_base")), ("stopped early", row.get("stopped_early")),
                                            ("collapsed", row.get("collapsed") is True)) if flag)
        figures = [f"{row[f'{name}_acc']:.3f}" + ("" if row[f"{name}_pass"] else " FAIL") for name in ATTACKS]
        cells = [f"`{row['trial_id']}`", *(_fmt(row[p]) for p in params), str(int(row["training_iteration"])), *figures,
                 f"{row['privacy_leak']:.3f}", f"{row[SCORE]:.3f}", "pass" if row["audit_pass"] else "FAIL", note]
        out.append("| " + " | ".join(cells) + " |")
    return out


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (float, np.floating)) else str(value)


def _settings_lines(settings: dict[str, Any]) -> list[str]:
    import yaml

    return yaml.safe_dump(settings, sort_keys=False, default_flow_style=None).rstrip().splitlines()
