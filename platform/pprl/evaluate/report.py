"""Write an evaluation out: report.json, report.md (the paper's table layout), predictions.parquet, privacy_utility.png.

Every file goes through ``pprl.storage`` (atomic, local or s3://).
"""

from __future__ import annotations

import io
import json
import time
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyarrow as pa  # noqa: E402

from pprl import storage  # noqa: E402
from pprl.evaluate.scenarios import Evaluation  # noqa: E402

SCENARIO_TITLES = {
    "privacy-unconstrained": "Privacy-unconstrained (train and test on originals)",
    "random-guess": "Random guess",
    "attack-1": "Attack 1 (train on originals, test on anonymised)",
    "attack-2": "Attack 2 (train and test on anonymised, true source labels)",
    "attack-3": "Attack 3 (the exported latent, MLP)",
}
PAPER_ATTACKERS = ("paper-cnn", "paper-mlp")
FILES = ("report.json", "report.md", "predictions.parquet", "privacy_utility.png")
# scenario -> (colour, marker, marker size, label height offset in points): distinct, so coinciding points stay readable
PLOT_STYLE = {
    "privacy-unconstrained": ("black", "*", 260, 8),
    "random-guess": ("grey", "s", 70, 6),
    "attack-1": ("tab:red", "o", 80, -14),
    "attack-2": ("tab:orange", "^", 80, 20),
    "attack-3": ("tab:blue", "D", 60, -26),
}


def build_report(evaluation: Evaluation, model_info: dict[str, Any], data_info: dict[str, Any], applications: dict[str, Any]) -> dict[str, Any]:
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": model_info,
        "data": data_info,
        **evaluation.to_dict(),
        "applications": applications,
    }


def write_report(out: str, report: dict[str, Any], evaluation: Evaluation, images: dict[str, bytes] | None = None) -> dict[str, str]:
    """Write every file under ``out``; returns {name: uri}."""
    storage.makedirs(out)
    written = {}
    for name, data in {
        "report.json": json.dumps(report, indent=2, default=_jsonable).encode(),
        "report.md": markdown(report).encode(),
        "privacy_utility.png": plot(report),
        **(images or {}),
    }.items():
        written[name] = storage.join(out, name)
        storage.write_bytes(written[name], data)
    written["predictions.parquet"] = storage.join(out, "predictions.parquet")
    storage.write_parquet(pa.Table.from_pandas(evaluation.predictions, preserve_index=False), written["predictions.parquet"])
    return written


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _by_scenario(rows: list[dict[str, Any]], paper: bool) -> dict[str, dict[str, Any]]:
    return {r["scenario"]: r for r in rows if (r["attacker"] in PAPER_ATTACKERS or r["scenario"] == "random-guess") == paper}


# ------------------------------------------------------------------------------------------------------- markdown


def table(report: dict[str, Any]) -> str:
    """The paper's Table 1 layout: one row per scenario; privacy (identity) and utility (expression) columns."""
    paper, strong = _by_scenario(report["rows"], True), _by_scenario(report["rows"], False)
    lines = [
        "| Scenario | Identity acc. (privacy, lower is better) | Expression acc. (utility, higher is better) | Identity acc., stronger attacker |",
        "|---|---:|---:|---:|",
    ]
    for scenario, title in SCENARIO_TITLES.items():
        row = paper.get(scenario)
        if row is None:
            continue
        s = strong.get(scenario)
        stronger = f"{_pct(s['identity_accuracy'])} ({s['attacker']})" if s else "–"
        lines.append(f"| {title} | {_pct(row['identity_accuracy'])} | {_pct(row['expression_accuracy'])} | {stronger} |")
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    opts, model, data = report["options"], report["model"], report["data"]
    parts = [
        f"# Privacy vs. utility: {model.get('uri', '?')}",
        "",
        f"Model version `{model.get('version', '?')}` ({model.get('image_size', '?')} px, {model.get('num_identities', '?')} identities); "
        f"data `{data.get('uri', '?')}` ({data.get('n_train_used', '?')} training images used, {data.get('n_test', '?')} test images).",
        f"Protocol: profile `{opts['profile']}`, paper classifiers {opts['paper_epochs']} epochs at batch {opts['paper_batch']}, "
        f"epoch chosen on a validation split of the training data; targets: random per image"
        f"{' (source identity allowed)' if opts['allow_source_target'] else ', never the source'}"
        f"{'; the training set was subsampled: not the full protocol' if opts['train_limit'] else ''}.",
        "",
        "## Privacy vs. utility (laid out like the paper's Table 1)",
        "",
        table(report),
        "",
        f"Chance: identity {_pct(report['chance']['identity'])}, expression {_pct(report['chance']['expression'])}. "
        "Paper attackers: the authors' CNN on images, their MLP on latents; stronger: a small ResNet with augmentation "
        "on images, a deeper/wider MLP on latents.",
    ]
    flags = report.get("privacy_flags") or []
    parts += ["", "**Privacy flags:** none" if not flags else "**Privacy flags:**", *(f"- WARNING: {flag}" for flag in flags)]
    parts += _suite_md(report) + _linkage_md(report) + _target_md(report) + _extras_md(report)
    return "\n".join(parts) + "\n"


def _suite_md(report: dict[str, Any]) -> list[str]:
    attacks = report.get("attacks") or []
    if not attacks:
        return []
    lines = [
        "", "## Attack suite (the privacy audit)", "",
        "Every attacker is trained on the training split with true source identities and scored on the test split. "
        "Bars: latent probes <= chance + 5 points; attack 2, inversion and linkage <= chance + 10 points; "
        "expression >= 90 %.",
        "", "| Attack | What | Figure | Bar | Chance | Pass | Seconds (CPU) |", "|---|---|---:|---:|---:|:---:|---:|",
    ]  # fmt: skip
    for a in attacks:
        cells = [a["name"], a["title"], _pct(a["figure"]), f"{a['op']} {_pct(a['bar'])}", _pct(a["chance"])]
        spent = f"{a['seconds']} ({a['cpu_seconds']})"
        lines.append("| " + " | ".join([*cells, "pass" if a["pass"] else "**FAIL**", spent]) + " |")
    audit = report["audit"]
    verdict = "PASSED" if audit["passed"] else f"FAILED ({', '.join(audit['failed'])})"
    return [*lines, "", f"**Verdict: {verdict}**", *_suite_details(attacks)]


def _suite_details(attacks: list[dict[str, Any]]) -> list[str]:
    by_name = {a["name"]: a for a in attacks}
    lines = [""]
    if "attack-2" in by_name:
        readers = ", ".join(f"{arch} {_pct(v)}" for arch, v in by_name["attack-2"]["attackers"].items())
        lines.append(f"- Attack 2 per attacker: {readers}.")
    if "judges" in by_name.get("expression-attack-1", {}):
        judged = by_name["expression-attack-1"]
        figures = ", ".join(_pct(v) for v in judged["judges"])
        lines.append(f"- Expression on anonymised images per judge (attack 1's CNN first): {figures}; worst "
                     f"{_pct(judged['worst_judge'])}.")  # fmt: skip
    if "inversion" in by_name:
        inv = by_name["inversion"]
        readers = ", ".join(f"{arch} {_pct(v)}" for arch, v in inv["readers"].items())
        lines.append(f"- Inversion: the unconstrained classifiers read the reconstructions at {readers} "
                     f"(inverter validation pixel score {inv['val_pixel_score']:.3f}, 1 = exact).")  # fmt: skip
    if "linkage" in by_name:
        link = by_name["linkage"]
        spaces = ", ".join(f"{name} {_pct(v)}" for name, v in link["spaces"].items())
        lines.append(f"- Linkage top-1 per feature space: {spaces}; a matcher that sees only the target identity: "
                     f"{_pct(link['target_only'])}.")  # fmt: skip
    return lines


def _linkage_md(report: dict[str, Any]) -> list[str]:
    if not report["linkage"]:
        return []
    lines = [
        "", "## Linkage attack", "",
        "Each anonymised test image is matched to the original test images by nearest neighbour (cosine) in the attacker's "
        "feature space. Identity: one of the k nearest originals shows the source identity. Instance: its own original is among them.",
        "",
        "| Attacker | Feature space of | Identity top-1 (chance) | Identity top-5 (chance) | Instance top-1 (chance) | Instance top-5 (chance) |",
        "|---|---|---:|---:|---:|---:|",
    ]  # fmt: skip
    for r in report["linkage"]:
        cells = [f"{_pct(r[f'{kind}_top{k}'])} ({_pct(r[f'{kind}_top{k}_chance'])})" for kind in ("identity", "instance") for k in (1, 5)]
        lines.append(f"| {r['attacker']} | {r['feature_space']} | " + " | ".join(cells) + " |")
    return lines


def _target_md(report: dict[str, Any]) -> list[str]:
    if not report["target_success"]:
        return []
    lines = ["", "## Target-identity success", "", "An identity classifier trained on originals, asked who the anonymised image shows:", "",
             "| Classifier | Recognised as the requested target | Chance |", "|---|---:|---:|"]  # fmt: skip
    lines += [f"| {r['classifier']} | {_pct(r['target_success_rate'])} | {_pct(r['chance'])} |" for r in report["target_success"]]
    return lines


def _extras_md(report: dict[str, Any]) -> list[str]:
    lines = ["", "## Other checks", ""]
    if report.get("d_expression_accuracy") is not None:
        lines.append(f"- The model's own discriminator expression head on the anonymised test images: {_pct(report['d_expression_accuracy'])}.")
    completion = report.get("applications", {}).get("completion")
    if completion:
        lines.append(
            f"- Completion (mouth box, {completion['faces']} faces): mean L1 in the box {completion['l1_completed']:.3f} "
            f"vs {completion['l1_grey_fill']:.3f} for the grey fill (0-1 scale). Images: `completion.png`."
        )
    if report.get("applications", {}).get("morph"):
        lines.append(f"- Expression morph: `morph.png` ({report['applications']['morph']})." )
    lines += ["", "## Classifiers", "", "| Job | Arch | Best epoch | Validation acc. | Seconds (CPU) |", "|---|---|---:|---:|---:|"]
    for key, c in report["classifiers"].items():
        epochs = f"{c['best_epoch']}/{len(c['history']) if c['spec']['patience'] else c['spec']['epochs']}"
        cells = [key, c["spec"]["arch"], epochs, _pct(c["val_accuracy"]), f"{c['seconds']} ({c['cpu_seconds']})"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Times (s): " + ", ".join(f"{k} {v}" for k, v in report["seconds"].items())]
    return lines


# ------------------------------------------------------------------------------------------------------- plot


def plot(report: dict[str, Any]) -> bytes:
    """Identity accuracy (x, privacy) vs expression accuracy (y, utility) per scenario, as PNG bytes.

    Each scenario is one point for the paper's classifiers; an x on the same height, joined by a dotted line, is the
    stronger attacker's identity accuracy in that scenario (its utility axis is the paper classifier's).
    """
    paper, strong = _by_scenario(report["rows"], True), _by_scenario(report["rows"], False)
    chance = report["chance"]
    fig, ax = plt.subplots(figsize=(9.5, 5.5), dpi=110)
    ax.axvline(100 * chance["identity"], color="grey", ls="--", lw=1, label="chance (identity / expression)")
    ax.axhline(100 * chance["expression"], color="grey", ls="--", lw=1)
    for scenario, row in paper.items():
        color, marker, size, dy = PLOT_STYLE[scenario]
        x, y = 100 * row["identity_accuracy"], 100 * row["expression_accuracy"]
        ax.scatter(x, y, s=size, marker=marker, color=color, zorder=3, alpha=0.85, label=f"{scenario} ({row['attacker']})")
        right = x > 70  # labels of points near the right edge go to their left
        ax.annotate(scenario, (x, y), textcoords="offset points", xytext=(-8 if right else 8, dy), ha="right" if right else "left", fontsize=8, color=color)
        s = strong.get(scenario)
        if s and s["identity_accuracy"] is not None:
            sx = 100 * s["identity_accuracy"]
            ax.plot([x, sx], [y, y], color=color, ls=":", lw=1.2)
            ax.scatter(sx, y, marker="x", s=60, color=color, zorder=4)
    ax.scatter([], [], marker="x", color="k", label="stronger attacker\n(same scenario, same utility)")
    ax.set(xlim=(0, 105), ylim=(0, 105), xlabel="identity accuracy % (privacy: lower is better)",
           ylabel="expression accuracy % (utility: higher is better)", title="Privacy vs. utility on the test split")  # fmt: skip
    ax.text(2, 103, "ideal: top-left", fontsize=8, color="green", va="top")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
