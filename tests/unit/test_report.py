"""`posttrain report`: the panels plot exactly the logged metrics, the PNGs are written and embedded in
the page, and (where a headless Chromium is installed) the page renders with every image decoded.

The GRPO-like run is synthetic: metrics.jsonl rows with the keys the GRPO controller logs (reward,
accuracy, response length, KL, clip fraction, entropy, mismatch telemetry, ratios, phase times,
generation tokens/s, MFU), so the RL panels are tested before a real GRPO run exists.
"""

from __future__ import annotations

import base64
import math
import re
import shutil
import subprocess

import pytest
from run_fixtures import grpo_rows, write_run

from posttrain.cli import main
from posttrain.metrics.report import panels, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_rl_panels_plot_exactly_the_logged_values():
    rows = grpo_rows()
    by_name = {p.name: p for p in panels(rows)}
    expected = {
        "loss", "lr", "grad_norm", "throughput", "mfu", "memory", "rl_reward", "rl_accuracy",
        "rl_response_length", "rl_kl", "rl_policy", "rl_mismatch", "rl_ratio", "rl_phase_time",
        "data_mix_samples", "eval",
    }  # fmt: skip
    assert set(by_name) == expected
    reward = by_name["rl_reward"]
    assert reward.series[0].steps == list(range(1, 13))
    assert reward.series[0].values == [r["reward/mean"] for r in rows if "reward/mean" in r]
    assert reward.band.values == [r["reward/std"] for r in rows if "reward/std" in r]
    assert [s.key for s in by_name["rl_mismatch"].series] == [
        "mismatch/mean_abs_logprob_diff",
        "mismatch/max_abs_logprob_diff",
    ]
    assert by_name["rl_mismatch"].log_y
    assert sorted(s.key for s in by_name["rl_phase_time"].series) == [
        "time/generate_s",
        "time/reference_s",
        "time/sync_s",
        "time/update_s",
    ]
    # accuracy panel: the step rows' accuracy and the eval rows' eval_accuracy (at steps 4, 8, 12)
    acc = {s.key: s for s in by_name["rl_accuracy"].series}
    evals = [r for r in rows if "eval_accuracy" in r]
    assert acc["eval_accuracy"].steps == [4, 8, 12]
    assert (
        acc["eval_accuracy"].values == [r["eval_accuracy"] for r in evals] == pytest.approx([0.2, 0.4, 0.6])
    )
    assert [s.key for s in by_name["throughput"].series] == ["tokens_per_s", "tokens_per_s/generate"]
    assert [s.key for s in by_name["rl_accuracy"].series] == ["accuracy", "pass@4", "eval_accuracy"]
    assert [s.key for s in by_name["rl_policy"].series] == ["clip_fraction", "clip_fraction/low", "entropy"]
    assert [s.key for s in by_name["rl_ratio"].series] == ["ratio/mean", "ratio/max", "is_ratio/mean"]
    assert [s.key for s in by_name["eval"].series] == ["eval_reward/mean"]
    # the NaN step is not drawn, but the finite lr of that row is
    assert by_name["loss"].series[0].steps[-1] == 12 and by_name["lr"].series[0].steps[-1] == 13
    assert [s.key for s in by_name["data_mix_samples"].series] == ["samples/arith", "samples/sort"]


def test_sft_like_rows_get_no_rl_panels_and_unknown_keys_go_to_other():
    rows = [
        {"step": s, "loss": 2.0 / s, "lr": 1e-3, "rewards/margin": 0.1 * s, "samples/a": s, "samples/b": 1}
        for s in range(1, 5)
    ]
    names = [p.name for p in panels(rows)]
    assert names == ["loss", "lr", "data_mix_samples", "other"]
    other = panels(rows)[-1]
    assert [s.key for s in other.series] == ["rewards/margin"]
    assert other.series[0].values == [r["rewards/margin"] for r in rows]


def _embedded(page: str) -> dict[str, bytes]:
    found = re.findall(r'data-file="([^"]+)" src="data:image/png;base64,([^"]+)"', page)
    return {name: base64.b64decode(data) for name, data in found}


def test_report_writes_pngs_and_embeds_them(tmp_path):
    import matplotlib.image

    run = write_run(tmp_path, grpo_rows())
    assert main(["report", str(run)]) == 0
    index = run / "report" / "index.html"
    page = index.read_text()
    embedded = _embedded(page)
    pngs = sorted(p.name for p in (run / "report").glob("*.png"))
    assert sorted(embedded) == pngs and "rl_reward.png" in pngs and "rl_mismatch.png" in pngs
    for name, data in embedded.items():
        assert data == (run / "report" / name).read_bytes() and data.startswith(PNG_MAGIC)
        image = matplotlib.image.imread(run / "report" / name)
        assert image.shape[0] > 200 and image.shape[1] > 300
        # something was drawn: not a blank canvas (the fraction of non-white pixels)
        assert (image[..., :3] < 0.9).any(axis=-1).mean() > 0.01, name
    assert '<a href="rl_reward.png">' in page and "finished" in page and "recipe: grpo" in page


def test_report_of_a_directory_without_metrics_names_the_file(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert f"{tmp_path / 'metrics.jsonl'} not found" in capsys.readouterr().err


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHECK_SCRIPT = """<script>
window.addEventListener("load", () => {
  const sizes = [...document.images].map(i => i.complete ? i.naturalWidth + "x" + i.naturalHeight : "0x0");
  document.body.setAttribute("data-rendered", sizes.join(","));
});
</script></body>"""


@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium: apt-get install chromium to run it")
def test_report_renders_in_headless_chromium(tmp_path):
    """Chromium loads the page from disk and decodes every embedded PNG at its real size."""
    import matplotlib.image

    run = write_run(tmp_path, grpo_rows())
    index = write_report(run)
    probe = index.with_name("probe.html")  # the page plus a script that reports each image's size
    probe.write_text(index.read_text().replace("</body>", CHECK_SCRIPT))
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000"]
    dom = subprocess.run(
        [*cmd, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    rendered = re.search(r'data-rendered="([^"]*)"', dom).group(1).split(",")
    names = re.findall(r'data-file="([^"]+)"', index.read_text())
    expected = []
    for name in names:
        h, w = matplotlib.image.imread(index.parent / name).shape[:2]
        expected.append(f"{w}x{h}")
    assert rendered == expected and len(rendered) >= 15
    shot = tmp_path / "shot.png"
    subprocess.run(
        [*cmd, "--window-size=1200,1600", f"--screenshot={shot}", index.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    image = matplotlib.image.imread(shot)
    assert image.shape[:2] == (1600, 1200) and (image[..., :3] < 0.5).any(axis=-1).mean() > 0.005
    assert not math.isnan(float(image.mean()))
