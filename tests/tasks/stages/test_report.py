"""The report on real upstream files written here: claim table and verdict, figures, self-contained HTML, blocks."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

from tasks import document
from tasks.config import ReportConfig, load_config
from tasks.ml import stats
from tasks.stages import evaluate, report
from tasks.stages.files import METRICS_FILE

PNG = b"\x89PNG\r\n\x1a\n"
N_TEST = 10_000
RUN_INFO_STAGES = {
    "validate": {"key": "a" * 64, "code_version": "c0de0001"},
    "pretrain": {"key": "b" * 64, "code_version": "c0de0002"},
}


def _write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def _predictions(wrong: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels 0..9 repeated, with the first `wrong` predictions shifted to the next digit."""
    y_true = np.arange(N_TEST) % 10
    y_pred = y_true.copy()
    y_pred[:wrong] = (y_pred[:wrong] + 1) % 10
    return y_true, y_pred


def _metrics(wrong: dict[str, int]) -> dict:
    return evaluate.assemble({name: stats.metrics_for(*_predictions(w), 0.95) for name, w in wrong.items()}, 0.95)


def _reconstruction_png(path: Path) -> Path:
    fig = Figure(figsize=(5, 1))
    axes = fig.subplots(2, 10)
    for ax in axes.flat:
        ax.imshow(np.random.default_rng(0).random((28, 28)))
        ax.axis("off")
    fig.savefig(path, dpi=50)
    return path


def _pretrain_dir(root: Path, epochs: int = 36, factor: float = 1.1) -> Path:
    rows = [{"epoch": e, "loss_last_batch": factor * nb, "loss_mean": factor * nb * 1.05,
             "val_loss": None if e % 2 else factor * nb, "seconds": 1.0}
            for e, nb in enumerate(report.NOTEBOOK_PRETRAIN_LOSS[:epochs], 1)]
    _write_json(root / "pretrain" / "training_log.json", rows)
    _reconstruction_png(root / "pretrain" / "reconstruction.png")
    return root / "pretrain"


def _validate_dir(root: Path) -> Path:
    directory = root / "validate" / ("a" * 64)
    _write_json(directory / "validation.json", {"success": True})
    (directory / "data_docs").mkdir()
    (directory / "data_docs" / "index.html").write_text("<html></html>")
    _write_json(directory / "manifest.json", {"stage": "validate", "summary": {
        "paragraph": "All 70000 images passed 14 expectations.", "data_docs": "data_docs/index.html"}})
    return directory


def _classifier_training_log(epochs: int, with_validation: bool = True) -> list[dict]:
    rows = []
    for e in range(1, epochs + 1):
        row = {"epoch": e, "loss": 1.0 / e, "accuracy": 0.9 + 0.01 * e}
        if with_validation:
            row |= {"val_loss": 1.1 / e, "val_accuracy": 0.89 + 0.01 * e}
        rows.append(row)
    return rows


def _inputs(root: Path, wrong: dict[str, int]) -> dict[str, Path]:
    _write_json(root / "finetune" / "pretrained_training_log.json", _classifier_training_log(5))
    # The training stages write loss_mean where an older layout had loss; the report reads either.
    _write_json(root / "finetune" / "probe_training_log.json",
                [{**r, "loss_mean": r.pop("loss")} for r in _classifier_training_log(3)])
    _write_json(root / "baselines" / "softmax_training_log.json", _classifier_training_log(4))
    _write_json(root / "baselines" / "ann_training_log.json", _classifier_training_log(4))
    _write_json(root / "evaluate" / METRICS_FILE, _metrics(wrong))
    return {"validate": _validate_dir(root), "pretrain": _pretrain_dir(root), "finetune": root / "finetune",
            "baselines": root / "baselines", "evaluate": root / "evaluate"}


def _run_info(profile: str = "seed") -> dict:
    config = load_config(profile).model_dump(mode="json", by_alias=True, exclude={"store": True})
    return {"config": config, "data_fingerprint": "fp0123456789abcd", "stages": RUN_INFO_STAGES}


def _image_sources(page: str) -> list[str]:
    return re.findall(r'\bsrc\s*=\s*"([^"]*)"', page)


def _assert_self_contained(page: str, out: Path) -> None:
    sources = _image_sources(page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    # Links only within the page (table of contents) or relative ones into the same store (Data Docs).
    hrefs = re.findall(r'\bhref\s*=\s*"([^"]*)"', page)
    assert all(h.startswith(("#", "../../validate/")) for h in hrefs), hrefs
    assert "<link" not in page and "<script" not in page
    assert len(re.findall(r"<img\b", page)) == len(sources)
    for uri in sources:
        assert base64.b64decode(uri.split(",", 1)[1]).startswith(PNG)


def test_full_report(tmp_path):
    inputs = _inputs(tmp_path / "in", {"softmax": 800, "ann": 500, "pretrained": 300, "probe": 600})
    out = tmp_path / "out"
    out.mkdir()
    summary = report.write_report(ReportConfig(title="Test report"), inputs, _run_info(), out)

    md = (out / "report.md").read_text()
    assert md.startswith("# Test report\n")
    # Wilson interval of 9700/10000, formatted as the table shows it.
    low, high = stats.accuracy_ci(9700, N_TEST, 0.95)
    ci = f"[{100 * low:.2f} %, {100 * high:.2f} %]"
    assert f"| pretrained | Pretrained encoder + softmax, fine-tuned | 97.00 % | {ci} |" in md
    assert "| softmax | Softmax regression on pixels | 92.00 % |" in md
    assert "| ann | ANN, same layers, random init | 95.00 % |" in md
    assert "| probe | Frozen pretrained encoder + softmax (probe) | 94.00 % |" in md
    assert "The claim held in this run: pretrained (97.00 %) > ann (95.00 %) > softmax (92.00 %)." in md
    assert "intervals of neighbouring models (pretrained and ann, ann and softmax) do not overlap." in md
    assert md.index("| softmax |") < md.index("| ann |") < md.index("| pretrained |") < md.index("| probe |")

    # The run's losses are 1.1 x the notebook's: a 10 % mean relative difference over the 36 shared epochs.
    assert "by 10.0 % on average" in md and "36 epochs both logs cover" in md
    assert "| 1 | 0.173456 | 0.190802 | +10.0 % |" in md and "| 10 | 0.051806 |" in md and "| 11 |" not in md
    assert summary["pretrain_mean_rel_diff"] == pytest.approx(0.1)

    assert "All 70000 images passed 14 expectations." in md
    assert f"[Great Expectations Data Docs: every expectation with its observed values](../../validate/{'a' * 64}/" \
           "data_docs/index.html)" in md
    assert "fp0123456789abcd" in md and "| pretrain | bbbbbbbbbbbb | c0de0002 |" in md
    assert '"profile": "seed"' in md
    assert "pretrained: 5 epochs, final validation accuracy 94.00 %" in md
    assert "## Best model: pretrained" in md

    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(figures) == sorted(["pretrain_loss.png", "reconstruction.png", "finetune_curves.png",
                                      "baselines_curves.png", "confusion.png"])
    for name in figures:
        assert (out / name).read_bytes().startswith(PNG)
        assert (out / name).stat().st_size < 150_000

    page = (out / "report.html").read_text()
    _assert_self_contained(page, out)
    assert len(_image_sources(page)) == len(figures)
    inlined = {base64.b64decode(s.split(",", 1)[1]) for s in _image_sources(page)}
    assert (out / "confusion.png").read_bytes() in inlined
    assert "<td>97.00 %</td>" in page and "The claim held in this run" in page
    # A table of contents after the title; the config dump last, under its heading, folded.
    headings = re.findall(r'<h2 id="([^"]+)">', page)
    toc = page[page.index('<nav class="toc">'):page.index("</nav>")]
    assert page.index("<h1") < page.index("<nav") < page.index("<h2")
    assert re.findall(r'href="#([^"]+)"', toc) == headings and headings[-1] == "configuration"
    assert page.index('id="configuration"') < page.index("<details><summary>Show all ") < page.index("&quot;seed&quot;")
    assert "Accuracy on 10,000 test images" in page
    assert len(page) < 1_000_000

    accuracy = json.loads((out / "accuracy.json").read_text())
    assert accuracy["claim_held"] is True and summary["claim_held"] is True
    assert [r["model"] for r in accuracy["rows"]] == ["softmax", "ann", "pretrained", "probe"]
    assert accuracy["rows"][2] == {"model": "pretrained", "accuracy": 0.97, "ci_low": low, "ci_high": high}
    assert summary["rows"] == accuracy["rows"] and summary["best_model"] == "pretrained"


def test_claim_that_fails_with_overlapping_intervals(tmp_path):
    inputs = _inputs(tmp_path / "in", {"softmax": 800, "ann": 490, "pretrained": 500})
    out = tmp_path / "out"
    out.mkdir()
    summary = report.write_report(ReportConfig(), inputs, _run_info(), out)
    md = (out / "report.md").read_text()
    assert summary["claim_held"] is False
    assert "The claim did not hold in this run: ann (95.10 %) > pretrained (95.00 %) > softmax (92.00 %)." in md
    assert "The 95 % confidence intervals of pretrained and ann overlap" in md
    assert "## Best model: ann" in md
    assert json.loads((out / "accuracy.json").read_text())["claim_held"] is False


def test_claim_needs_all_three_models():
    rows = [{"model": "softmax", "accuracy": 0.9, "ci_low": 0.89, "ci_high": 0.91},
            {"model": "pretrained", "accuracy": 0.95, "ci_low": 0.94, "ci_high": 0.96}]
    held, text = report.judge_claim(rows, "95 %")
    assert held is None and "no test accuracy for ann" in text


def test_pretrain_only_report(tmp_path):
    root = tmp_path / "in"
    inputs = {"validate": _validate_dir(root), "pretrain": _pretrain_dir(root, epochs=20)}
    out = tmp_path / "out"
    out.mkdir()
    summary = report.write_report(ReportConfig(), inputs, _run_info("seed-part2"), out)
    md = (out / "report.md").read_text()
    assert "Claim" not in md and "| Model |" not in md
    assert "784-256-128" in md and "not compared" in md and "on average" not in md
    assert sorted(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)) == ["pretrain_loss.png", "reconstruction.png"]
    _assert_self_contained((out / "report.html").read_text(), out)
    assert summary["claim_held"] is None and summary["rows"] == [] and summary["pretrain_mean_rel_diff"] is None
    assert json.loads((out / "accuracy.json").read_text()) == {"rows": [], "claim_held": None, "confidence": None}


def test_missing_optional_files_and_keys(tmp_path):
    root = tmp_path / "in"
    inputs = _inputs(root, {"softmax": 800, "ann": 500, "pretrained": 300})
    (root / "finetune" / "probe_training_log.json").unlink()
    (root / "pretrain" / "reconstruction.png").unlink()
    _write_json(root / "baselines" / "ann_training_log.json", _classifier_training_log(2, with_validation=False))
    _write_json(inputs["validate"] / "manifest.json", {"stage": "validate"})
    out = tmp_path / "out"
    out.mkdir()
    report.write_report(ReportConfig(), inputs, {}, out)
    md = (out / "report.md").read_text()
    assert "The reconstruction figure is missing." in md
    assert "ann: 2 epochs, final training accuracy 92.00 %" in md
    assert "The validation stage left no summary paragraph." in md
    assert "Data fingerprint: unknown" in md
    assert "not compared" in md  # without a config the architecture is unknown, so no comparison is claimed


def test_non_notebook_training_is_flagged(tmp_path):
    root = tmp_path / "in"
    inputs = {"pretrain": _pretrain_dir(root, epochs=5, factor=0.5)}
    info = _run_info("seed")
    info["config"]["pretrain"]["optimizer"] = "adam"
    out = tmp_path / "out"
    out.mkdir()
    summary = report.write_report(ReportConfig(), inputs, info, out)
    md = (out / "report.md").read_text()
    assert "by 50.0 % on average" in md and "optimizer 'adam'" in md
    assert summary["pretrain_mean_rel_diff"] == pytest.approx(0.5)


def test_notebook_log_constant():
    assert len(report.NOTEBOOK_PRETRAIN_LOSS) == 36
    assert report.NOTEBOOK_PRETRAIN_LOSS[0] == 0.173456 and report.NOTEBOOK_PRETRAIN_LOSS[-1] == 0.031706
    assert report.loss_difference([{"epoch": 37, "loss_last_batch": 0.1}]) == (None, 0)


def test_blocks_round_trip_and_appended_section(tmp_path):
    inputs = _inputs(tmp_path / "in", {"softmax": 800, "ann": 500, "pretrained": 300})
    first = tmp_path / "first"
    first.mkdir()
    report.write_report(ReportConfig(), inputs, _run_info(), first)
    blocks = document.load_blocks(first / document.BLOCKS_FILE)
    assert any(isinstance(b, document.Table) for b in blocks) and any(isinstance(b, document.Image) for b in blocks)
    assert document.to_markdown(blocks) == (first / "report.md").read_text()
    document.save_blocks(blocks, tmp_path / "again.json")
    assert document.load_blocks(tmp_path / "again.json") == blocks

    # A later step appends its own section, with a figure of its own, and re-renders into a new directory.
    second = tmp_path / "second"
    second.mkdir()
    _reconstruction_png(second / "trend.png")
    blocks += [document.Heading("Promotion"), document.Paragraph("Promoted: <b>yes</b> & p < 0.05"),
               document.table_from_records([{"run": 1, "pretrained": 0.97123, "promoted": True},
                                          {"run": 2, "pretrained": None, "promoted": False}]),
               document.Image("trend.png", "Accuracy trend")]
    paths = document.render(blocks, second, "report", assets=first)
    md = paths["markdown"].read_text()
    assert md.index("## Configuration") < md.index("## Promotion")
    assert "Promoted: <b>yes</b> & p < 0.05" in md and "| 1 | 0.9712 | True |" in md and "| 2 |  | False |" in md
    assert "![Accuracy trend](trend.png)" in md and (second / "confusion.png").is_file()
    page = paths["html"].read_text()
    assert "<p>Promoted: &lt;b&gt;yes&lt;/b&gt; &amp; p &lt; 0.05</p>" in page and "<b>yes</b>" not in page
    _assert_self_contained(page, second)
    assert len(_image_sources(page)) == 6
    assert document.load_blocks(second / document.BLOCKS_FILE) == blocks


def test_rendering_escapes_markup():
    blocks = [document.Heading('A "quoted" <title>', 1), document.Table(("a|b", "c"), (("x|y", "line\nbreak"),)),
              document.Code("<script>alert(1)</script>", "html"), document.Bullets(("<i>",))]
    md = document.to_markdown(blocks)
    assert "| a\\|b | c |" in md and "| x\\|y | line break |" in md
    page = document.to_html(blocks, Path("."), "t<")
    assert "<script>" not in page and "&lt;script&gt;" in page and "<title>t&lt;</title>" in page
    assert "<li>&lt;i&gt;</li>" in page and "<td>x|y</td>" in page


def test_rendering_failures(tmp_path):
    with pytest.raises(FileNotFoundError):
        document.render([document.Image("missing.png", "gone")], tmp_path, "report")
    (tmp_path / "figure.gif").write_bytes(b"GIF89a")
    with pytest.raises(ValueError, match="unsupported image type"):
        document.to_html([document.Image("figure.gif", "gif")], tmp_path, "t")
    (tmp_path / "bad.json").write_text(json.dumps([{"kind": "video", "path": "x"}]))
    with pytest.raises(ValueError, match="unknown block kind"):
        document.load_blocks(tmp_path / "bad.json")


def test_claim_verdict_quotes_the_paired_test():
    metrics = {**_metrics({"softmax": 3, "ann": 2, "pretrained": 1}),
               "paired": [{"models": ["pretrained", "ann"], "only_first_right": 12, "only_second_right": 3,
                           "p_value": 0.035}]}
    blocks, _, held = report.claim_section(metrics)
    text = " ".join(b.text for b in blocks if isinstance(b, document.Paragraph))
    assert held is True
    assert "pretrained vs ann: p = 0.035 (pretrained alone right on 12 images, ann alone on 3)" in text
