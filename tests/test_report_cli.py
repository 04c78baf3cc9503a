"""report.html content and the `python -m runner.report` command line."""

import os
import re
import subprocess
import sys

import pytest

from runner.report.__main__ import main
from test_report_synthetic import REPO_ROOT, make_failed_job, make_run, sla_row

# A config value with markup and a URL: the page must show it as text, never load it.
HOSTILE_MODEL = '<script>alert("x")</script> & co'
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//|url\(\s*["']?(?:https?:)?//|@import""", re.I)


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    make_run(run, loads=(1, 2, 4), overrides=["+sla=ttft_strict", f"model.name={HOSTILE_MODEL}"],
             config={"model": {"name": HOSTILE_MODEL}, "endpoint": {"url": "http://127.0.0.1:8801/v1/chat/completions"},
                     "sla": {"rules": [{"p99_ttft": "<=0.05"}]}},
             sla_rows=[sla_row("p99_ttft <= 0.05", 4.0)])
    return run


def test_run_html_embeds_images(run_dir, capsys):
    assert main([str(run_dir)]) == 0
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert page.count('<img src="data:image/png;base64,') == 5
    printed = capsys.readouterr().out.splitlines()
    assert str(run_dir / "report.html") in printed
    assert str(run_dir / "latency_vs_load.png") in printed


def test_run_html_tables_and_config(run_dir):
    main([str(run_dir)])
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert '<table class="dataframe data">' in page
    assert "<th>p99_ttft</th>" in page
    assert "<td>0.04</td>" in page  # p99 TTFT at parallel 4
    assert "<td>p99_ttft &lt;= 0.05</td>" in page  # the SLA table
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; co" in page
    assert "<script" not in page
    assert "url: http://127.0.0.1:8801/v1/chat/completions" in page  # as text inside <pre>
    assert "Detailed Performance Metrics" in page  # performance_summary.txt


def test_html_has_no_external_resources(run_dir):
    main([str(run_dir)])
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert not EXTERNAL.search(page)
    assert "<link" not in page


def test_sweep_html_lists_failed_job(tmp_path, capsys):
    make_run(tmp_path / "0", loads=(1, 2), overrides=["model=a", "+sla=x"], sla_rows=[sla_row("tps -> max", 2.0)])
    make_failed_job(tmp_path / "1", ["model=b", "+sla=x"], "EndpointError: <html> 502 from upstream\nsecond line")
    assert main([str(tmp_path), "--no-run-plots"]) == 0
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "<td>failed</td>" in page
    assert "EndpointError: &lt;html&gt; 502 from upstream\nsecond line" in page
    assert "1 failed" in page
    assert page.count('<img src="data:image/png;base64,') == 5
    assert not EXTERNAL.search(page)
    printed = capsys.readouterr().out.splitlines()
    assert printed[:3] == [str(tmp_path / name) for name in ("summary.csv", "sla_summary.csv", "summary.md")]


def test_sweep_html_links_job_reports(tmp_path):
    make_run(tmp_path / "0", loads=(1,), overrides=["model=a"])
    make_run(tmp_path / "1", loads=(2,), overrides=["model=b"])
    main([str(tmp_path), "--run-plots"])
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert '<a href="0/report.html">job 0</a>' in page
    assert '<a href="1/report.html">job 1</a>' in page


def test_missing_dir_exits_2(tmp_path):
    missing = tmp_path / "nope"
    result = subprocess.run([sys.executable, "-m", "runner.report", str(missing)], capture_output=True, text=True,
                            cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: report folder not found: ")
    assert str(missing) in result.stderr


def test_folder_without_run_exits_2(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("no run here", encoding="utf-8")
    assert main([str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith(f"error: no run in {tmp_path}")


def test_failed_single_run_exits_2(tmp_path, capsys):
    (tmp_path / "summary.csv").write_text("", encoding="utf-8")
    (tmp_path / "error.txt").write_text("ConfigError: load.parallel must be >= 1, got 0\n", encoding="utf-8")
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: no usable results in {tmp_path}: ConfigError: load.parallel must be >= 1, got 0\n"


def test_closed_pipe_ends_quietly(run_dir):
    # As in `python -m runner.report RUN | head -1`, with the reader gone before the first write.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "runner.report", str(run_dir)], stdout=write_end,
                                stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT, timeout=120)
    finally:
        os.close(write_end)

    assert "Traceback" not in result.stderr
    assert result.returncode == 141
