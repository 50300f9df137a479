"""The report of ``secmig demo`` as a browser shows it: headless Chromium, every section, no console error."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from secmig.cli import main
from secmig.report import SECTIONS

CHECK = """(() => {
  const sections = {};
  for (const id of %s) {
    const el = document.getElementById(id);
    sections[id] = el === null ? null : {
      heading: el.querySelector("h2") ? el.querySelector("h2").textContent : "",
      height: el.getBoundingClientRect().height,
      text: el.innerText.slice(0, 4000),
    };
  }
  const images = [...document.images].map(i => ({loaded: i.complete && i.naturalWidth > 0, alt: i.alt,
                                                 scheme: i.src.split(":")[0]}));
  return {title: document.title, sections, images, scripts: document.scripts.length};
})()""" % [sid for sid, _ in SECTIONS]


def artifacts_dir(tmp_path: Path) -> Path:
    d = Path(os.environ.get("SECMIG_ARTIFACTS", tmp_path))
    d.mkdir(parents=True, exist_ok=True)
    return d


def test_demo_report_opens_in_chromium_with_every_section(tmp_path: Path, chromium: Any) -> None:
    """The demo's report loads offline with no console error, shows all six sections and all its charts."""
    out = tmp_path / "out"
    assert main(["demo", "--out", str(out)]) == 0
    report = out / "demo-run1" / "report.html"
    visit = chromium.open_page(report.as_uri(), CHECK)
    assert visit.errors == []
    assert all(u.startswith(("file:", "data:")) for u in visit.requests), visit.requests
    page = visit.value
    assert page["title"] == "secmig report: demo, run 1" and page["scripts"] == 0
    for sid, title in SECTIONS:
        sec = page["sections"][sid]
        assert sec is not None, f"section {sid} missing"
        assert sec["heading"] == title and sec["height"] > 50
    assert "cache-1" in page["sections"]["migrations"]["text"]
    assert "aborted" in page["sections"]["migrations"]["text"]
    assert "No monitor verdicts recorded for this run" in page["sections"]["monitor"]["text"]
    assert "No audit log recorded for this run" in page["sections"]["audit"]["text"]
    assert len(page["images"]) == 3  # migrations, rounds, links
    assert all(i["loaded"] and i["scheme"] == "data" for i in page["images"]), page["images"]
    shot = chromium.screenshot(report.as_uri(), artifacts_dir(tmp_path) / "report-demo.png")
    assert shot.stat().st_size > 50_000
    print(f"screenshot: {shot}")


def test_chromium_harness_sees_console_errors_and_exceptions(tmp_path: Path, chromium: Any) -> None:
    """The harness is not blind: a page that logs an error, throws and loads a missing image is caught."""
    page = tmp_path / "bad.html"
    page.write_text(
        "<!DOCTYPE html><html><head><title>bad</title></head><body><img src='missing.png'>"
        "<script>console.error('boom'); undefinedFunction();</script></body></html>"
    )
    visit = chromium.open_page(page.as_uri(), "document.title")
    assert visit.value == "bad"
    text = "\n".join(visit.errors)
    assert "console: boom" in text
    assert "undefinedFunction" in text
    assert "missing.png" in text or "ERR_FILE_NOT_FOUND" in text
