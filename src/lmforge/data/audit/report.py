"""The audit report for people: a Markdown table (report.md, also printed) and one plot per section.

    pronouns.png    share of documents with each pronoun family (Llama 2's Table 9a)
    identity.png    per identity axis, its share of documents and its most mentioned terms (Table 9b)
    toxicity.png    the distribution of documents' toxicity scores, log-scaled counts (Figure 13)
    languages.png   the most frequent languages by share of documents, log-scaled (Table 10)

Both read only the JSON report (`Tally.report` plus the audit's settings), so they can be made again from
report.json alone.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from lmforge.data.audit.tally import top_terms

LANGUAGES_SHOWN = 15


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def format_report(report: dict) -> str:
    """The report as Markdown tables (shares in percent)."""
    out = ["# Data audit", "",
           f"{report['documents']} documents, {report['words']} words, {report['characters']} characters; "
           f"inputs: {', '.join(report['inputs'])}", f"term list: {report['settings']['terms']}", ""]

    def groups(title: str, section: str, share_label: str) -> None:
        out.extend([f"## {title}", "", f"| {share_label} | documents | % of documents | mentions | most mentioned "
                    "(% of the group's mentions) |", "|---|---:|---:|---:|---|"])
        for name, g in report[section].items():
            top = ", ".join(f"{t} ({_pct(v['share_of_group'])})" for t, v in top_terms(g)) or "-"
            out.append(f"| {name} | {g['documents']} | {_pct(g['share_of_documents'])} | {g['mentions']} | {top} |")
        out.append("")

    groups("Pronouns", "pronouns", "family")
    groups("Identity terms", "identity", "axis")
    tox = report["toxicity"]
    mean, top = ("-" if tox[k] is None else f"{tox[k]:.4f}" for k in ("mean", "max"))
    out.extend(["## Toxicity", "", f"scorer: {report['settings']['toxicity_scorer']}", "",
                f"| mean | max | % of documents >= {tox['threshold']} | % of documents > 0 |", "|---:|---:|---:|---:|",
                f"| {mean} | {top} | {_pct(tox['share_at_least_threshold'])} | {_pct(tox['share_nonzero'])} |", ""])
    out.extend(["## Languages", "", f"identifier: {report['settings']['language_identifier']}", "",
                "| language | documents | % of documents | % of characters |", "|---|---:|---:|---:|"])
    languages = list(report["languages"].items())
    for code, lang in languages[:LANGUAGES_SHOWN]:
        out.append(f"| {code} | {lang['documents']} | {_pct(lang['share_of_documents'])} | "
                   f"{_pct(lang['share_of_characters'])} |")
    if len(languages) > LANGUAGES_SHOWN:
        rest = languages[LANGUAGES_SHOWN:]
        docs = sum(v["documents"] for _, v in rest)
        out.append(f"| {len(rest)} others | {docs} | {_pct(docs / report['documents'])} | "
                   f"{_pct(sum(v['characters'] for _, v in rest) / report['characters'])} |")
    return "\n".join(out) + "\n"


def write_plots(report: dict, folder: Path) -> list[Path]:
    """The four plots of the module docstring, written into `folder`; their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        paths.append(folder / name)

    n = report["documents"]
    fig, ax = plt.subplots(figsize=(5, 3))
    families = list(report["pronouns"].items())
    ax.bar([f for f, _ in families], [100 * (g["share_of_documents"] or 0) for _, g in families], color="tab:blue")
    ax.set_ylabel("% of documents")
    ax.set_title(f"documents with each pronoun family (N = {n})", fontsize=9)
    save(fig, "pronouns.png")

    axes_items = list(report["identity"].items())
    fig, axes = plt.subplots(1, len(axes_items), figsize=(3 * len(axes_items), 3), squeeze=False)
    for ax, (name, g) in zip(axes[0], axes_items):
        top = top_terms(g)
        if top:
            ax.barh([t for t, _ in top][::-1], [100 * v["share_of_group"] for _, v in top][::-1], color="tab:green")
        else:
            ax.text(0.5, 0.5, "no mentions", ha="center", va="center", transform=ax.transAxes, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        ax.set_title(f"{name}: {_pct(g['share_of_documents'])} of docs", fontsize=8)
        ax.set_xlabel("% of the axis's mentions", fontsize=8)
        ax.tick_params(labelsize=7)
    save(fig, "identity.png")

    tox = report["toxicity"]
    fig, ax = plt.subplots(figsize=(5, 3))
    edges, counts = tox["histogram"]["edges"], tox["histogram"]["counts"]
    ax.bar(edges[:-1], counts, width=edges[1] - edges[0], align="edge", color="tab:red")
    ax.set_yscale("log")
    ax.axvline(tox["threshold"], color="k", lw=0.8, ls="--")
    ax.set_xlabel("toxicity score")
    ax.set_ylabel("documents")
    ax.set_title(textwrap.fill(report["settings"]["toxicity_scorer"], 70), fontsize=7)
    save(fig, "toxicity.png")

    languages = list(report["languages"].items())[:LANGUAGES_SHOWN]
    fig, ax = plt.subplots(figsize=(5, 0.8 + 0.25 * len(languages)))
    ax.barh([c for c, _ in languages][::-1], [100 * v["share_of_documents"] for _, v in languages][::-1],
            color="tab:purple")
    ax.set_xscale("log")
    ax.set_xlabel("% of documents")
    ax.set_title(textwrap.fill(report["settings"]["language_identifier"], 70), fontsize=7)
    save(fig, "languages.png")
    return paths
