"""report.html: what test_draem.py found, for people, in a folder that opens from disk.

Per run: the thresholds it was judged at (with a warning when they were tuned on this test set), the metrics
and operating points, ROC and PR curves (image and pixel), the image-score histogram of good and defective
images with the image threshold, the per-defect-type rows, and every test image's panel, errors first
(missed defects, then false alarms), each group by score. Plain HTML and PNG plots,
relative links only: the results folder can be zipped and sent, and nothing is fetched from a network.
"""
import html
import math
from pathlib import Path
from urllib.parse import quote

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from scoring.metrics import METRICS, percent  # noqa: E402
from scoring.protocols import BENCHMARK_NAMES, PROTOCOLS  # noqa: E402

ERROR_ORDER = {"missed defect": 0, "false alarm": 1, "": 2}
STYLE = """body{font-family:sans-serif;margin:24px;color:#222;max-width:1600px}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}h2{margin-top:36px;border-bottom:2px solid #444}
img.plot{max-width:100%;display:block;margin:8px 0}.cases{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;border:1px solid #ccc;padding:6px;max-width:480px}figure img{width:100%;display:block}
figure.error{border:3px solid #c00}figcaption{font-size:13px;word-break:break-all}.bad{color:#c00;font-weight:bold}.optimistic{color:#a60}"""


def coverage_text(coverage: dict) -> str:
    """How many defect images had masks, as "with/all"."""
    return f"{coverage['defect_images_with_mask']}/{coverage['defect_images']}"


def ordered_cases(cases: list[dict]) -> list[dict]:
    """Missed defects, then false alarms, then the rest; each group from the highest score down."""
    return sorted(cases, key=lambda c: (ERROR_ORDER[c["error"]], -c["score"]))


def plot_curves(curves: dict, metrics: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    for column, level in enumerate(("image", "pixel")):
        roc, pr = axes[2 * column], axes[2 * column + 1]
        roc.plot(curves[level]["fpr"], curves[level]["tpr"], color="C0")
        roc.plot([0, 1], [0, 1], color="0.7", linestyle=":")
        roc.set(title=f"{level} ROC (AUROC {percent(metrics[f'{level}_auroc'])})", xlabel="false positive rate",
                ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.02))
        pr.plot(curves[level]["recall"], curves[level]["precision"], color="C3")
        pr.set(title=f"{level} PR (AP {percent(metrics[f'{level}_ap'])})", xlabel="recall", ylabel="precision",
               xlim=(0, 1), ylim=(0, 1.02))
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_histogram(cases: list[dict], threshold: float | None, path: Path) -> None:
    good = [c["score"] for c in cases if not c["label"]]
    defective = [c["score"] for c in cases if c["label"]]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    low, high = min(c["score"] for c in cases), max(c["score"] for c in cases)
    bins = [low + (high - low) * i / 30 for i in range(31)] if high > low else 10
    ax.hist(good, bins, alpha=0.6, color="C2", label=f"good ({len(good)})")
    ax.hist(defective, bins, alpha=0.6, color="C3", label=f"defective ({len(defective)})")
    if threshold is not None and not math.isnan(threshold):
        ax.axvline(threshold, color="k", linestyle="--", label=f"image threshold {threshold:.3f}")
    ax.set(xlabel="image score", ylabel="test images", title="image scores")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def table(head: list[str], rows: list[list[str]]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def case_figure(case: dict) -> str:
    label = case["defect_type"] if case["label"] else "good"
    error = f'<span class="bad">{case["error"].upper()}</span> · ' if case["error"] else ""
    picture = f'<img src="{quote(case["panel"])}" loading="lazy" alt="panel">' if case["panel"] else ""
    return (f'<figure class="case{" error" if case["error"] else ""}" data-path="{html.escape(case["path"])}" '
            f'data-score="{case["score"]!r}" data-error="{case["error"]}">{picture}<figcaption>{error}'
            f'{html.escape(label)} · score {case["score"]:.6g} · {case["verdict"]}<br>{html.escape(case["path"])}'
            f'</figcaption></figure>')


def run_section(index: int, run: str, result: dict, detail: dict, files: Path) -> str:
    curves_png, histogram_png = files / f"run{index:02d}_curves.png", files / f"run{index:02d}_scores.png"
    image, pixel = result["operating_points"]["image"], result["operating_points"]["pixel"]
    used = result["thresholds"]
    plot_curves(detail["curves"], result, curves_png)
    plot_histogram(detail["cases"], used["image"]["value"], histogram_png)
    points = table(["operating point", "threshold", "what it costs on this test set"], [
        ["max F1 (image)", f"{image['threshold']:.6g}",
         f"precision {percent(image['precision'])} %, recall {percent(image['recall'])} %, F1 {percent(image['f1'])}"],
        ["no escapes (every defective image flagged)", f"{image['threshold_no_escape']:.6g}",
         f"false alarms on {percent(image['false_alarm_rate'])} % of good images"],
        ["no false alarms (no good image flagged)", f"{image['threshold_no_false_alarm']:.6g}",
         f"escapes: {percent(image['escape_rate'])} % of defective images missed"],
        ["max F1 (pixel): defect masks", f"{pixel['threshold']:.6g}", f"pixel F1 {percent(pixel['f1'])}"]])
    defects = table(["defect type", "images", "with masks", "image AUROC", "pixel AP"],
                    [[d, r["images"], r["images_with_mask"], percent(r["image_auroc"]), percent(r["pixel_ap"])]
                     for d, r in result["per_defect_type"].items()])
    cases = ordered_cases(detail["cases"])
    errors = sum(1 for c in cases if c["error"])
    return (f'<h2 id="run{index:02d}">{html.escape(run)} [{html.escape(result["category"])}]</h2>'
            f"{left_out_note(result)}{threshold_note(used)}"
            f'<img class="plot" src="{files.name}/{curves_png.name}" alt="ROC and PR curves">'
            f'<img class="plot" src="{files.name}/{histogram_png.name}" alt="image score histogram">'
            f"<h3>Operating points</h3>{points}<h3>Per defect type</h3>{defects}"
            f"<h3>Test images ({len(cases)}; {errors} wrong at the image threshold, shown first)</h3>"
            f'<div class="cases">{"".join(case_figure(c) for c in cases)}</div>')


def left_out_note(result: dict) -> str:
    """Which defect images were not scored because the model trained on them."""
    left_out = result["left_out"]
    if not left_out:
        return ""
    names = "".join(f"<li>{html.escape(p)}</li>" for p in left_out)
    return (f'<p class="left-out"><b>{html.escape(result["left_out_text"].capitalize())}</b>: the model trained '
            f"on them, so they are not scored.</p><details><summary>the {len(left_out)} files left out</summary>"
            f"<ul>{names}</ul></details>")


def threshold_note(used: dict) -> str:
    """Which thresholds the verdicts and defect masks below use, and a warning when they were tuned on these
    very images."""
    lines = [f"{kind} threshold {'none' if t['value'] is None else format(t['value'], '.6g')} "
             f"({html.escape(t['source'])})" for kind, t in used.items()]
    note = f'<p class="thresholds">Judged at: {"; ".join(lines)}.</p>'
    if any(t["optimistic"] for t in used.values()):
        note += ('<p class="optimistic"><b>Optimistic:</b> a threshold here was tuned on this test set (its own '
                 'maximum F1), so the missed defects and false alarms below are fewer than the line will see. '
                 'Judge at a threshold set on other images: <code>--threshold calibrated</code> after '
                 '<code>test_draem.py --calibrate GOOD_DIR</code>, or a number.</p>')
    return note


def protocol_section(results: dict[str, dict], means: list[dict]) -> str:
    """Each benchmark protocol's own columns, named as its authors name them: per run, then the mean per
    configuration over its categories."""
    html_parts = []
    for protocol in sorted({r.get("protocol", "mvtec_ad") for r in results.values()}):
        columns = PROTOCOLS[protocol]
        if not columns:
            continue
        runs = {run: r for run, r in results.items() if r.get("protocol") == protocol}
        rows = [[r["data_set"], run, r["category"], *(percent(r["protocol_metrics"].get(m)) for m in columns)]
                for run, r in runs.items()]
        rows += [[row["data_set"], f"mean of {row['configuration']}", f"{len(row['runs'])} run(s)",
                  *(percent(row["protocol_metrics"].get(m)) for m in columns)]
                 for row in means if set(row["runs"]) <= set(runs)]
        html_parts.append(f'<h2 id="protocol-{protocol}">{BENCHMARK_NAMES[protocol]}: the benchmark\'s own metrics</h2>'
                          f"<p>As its authors compute them (--protocol {protocol}; docs/evaluation.md).</p>"
                          + table(["data set", "run", "category", *columns.values()], rows))
    return "".join(html_parts)


def write_report(out_dir: Path, results: dict[str, dict], details: dict[str, dict], means: list[dict],
                 seeds: list[dict]) -> Path:
    files = out_dir / "report_files"
    files.mkdir(parents=True, exist_ok=True)
    names = list(METRICS.values())
    summary = table(["data set", "run", "category", *names, "defect images with masks"],
                    [[r["data_set"], run, r["category"], *(percent(r[m]) for m in METRICS),
                      coverage_text(r["mask_coverage"])]
                     for run, r in sorted(results.items(), key=lambda item: item[1]["data_set"])])
    mean_table = table(["data set", "configuration", "runs", *names],
                       [[row["data_set"], row["configuration"], len(row["runs"]), *(percent(row[m]) for m in METRICS)]
                        for row in sorted(means, key=lambda row: row["data_set"])])
    seed_table = table(["category", "configuration", "seeds", *names],
                       [[row["category"], row["configuration"], ", ".join(map(str, row["seeds"])),
                         *(f"{percent(row[m]['mean'])} ± {percent(row[m]['std'])}" for m in METRICS)]
                        for row in seeds]) if seeds else ""
    benchmarks = protocol_section(results, means)
    sections = "".join(run_section(i, run, results[run], details[run], files) for i, run in enumerate(results))
    page = (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>DRAEM results</title><style>{STYLE}</style>'
            f"</head><body><h1>DRAEM results</h1>{summary}"
            f"<p>Mean per configuration (runs whose settings differ only in the category).</p>{mean_table}"
            + (f"<p>Runs that differ only in --seed: mean ± sample standard deviation.</p>{seed_table}" if seeds else "")
            + f"{benchmarks}{sections}</body></html>\n")
    path = out_dir / "report.html"
    path.write_text(page)
    return path
