"""report.html: soft_targets.json holds the exact logits, and the page, driven in a real headless Chromium
(Playwright), shows softmax(logits / T) at the slider's T, the stored student epoch by epoch, and KL.

The browser is the system's Chromium (Debian's `chromium` package; .ci/run installs it). Without one
the browser tests skip and say why; with KDRUN_REQUIRE_BROWSER=1 (CI) they fail instead.
"""
import base64
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from kdrun.run_files import SOFT_TARGETS_FILE
from kdrun.sweeps.report import main
from kdrun.tensorboard.figures import displayable
from kdrun.tensorboard.soft_target_record import SoftTargetRecord
from kdrun.tensorboard.soft_targets import figure_positions, soft_target_logger
from kdrun.tensorboard.writer import open_writer
from test_report import make_run, metrics

TOLERANCE = 1e-6
# A tiny distillation: 2 figure images, 2 epochs, no baseline, 8x8 images (the later value of a key wins).
RUN_ARGS = ("epochs=2", "tb_figures=2", "baseline=false", "dataset.image_size=8", "dataset.train_size=64",
            "dataset.test_size=32")


def softmax(logits, T):
    z = np.asarray(logits, dtype=np.float64) / T
    e = np.exp(z - z.max())
    return e / e.sum()


def kl(p, q):
    return float(np.sum(p * (np.log(p) - np.log(q))))


# ---- soft_targets.json --------------------------------------------------------------------------

def tiny_bundle():
    from kdrun.data import build_dataset

    return build_dataset({"name": "synthetic", "image_size": 8, "train_size": 30, "test_size": 12,
                          "num_classes": 3, "in_chans": 1})


def test_record_holds_the_exact_logits_and_a_resumed_run_keeps_its_earlier_epochs(tmp_path):
    data = tiny_bundle()
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    positions = figure_positions(len(data.test), 2)
    images = torch.stack([data.test[i][0] for i in positions])
    writer = open_writer(tmp_path)
    on_epoch = soft_target_logger(writer, data, student, teacher, 2.5, 2, torch.device("cpu"))
    before = student(images).detach()
    on_epoch(0, {})
    with torch.no_grad():
        student[1].weight.mul_(-3)
    on_epoch(1, {})
    writer.close()

    record = json.loads((tmp_path / SOFT_TARGETS_FILE).read_text())
    assert record["T"] == 2.5 and record["class_names"] == data.class_names
    assert [image["position"] for image in record["images"]] == positions
    assert [image["label"] for image in record["images"]] == [int(data.test[i][1]) for i in positions]
    # every stored number reads back as the very float32 the model produced
    stored_teacher = torch.tensor([image["teacher_logits"] for image in record["images"]], dtype=torch.float32)
    assert torch.equal(stored_teacher, teacher(images).detach())
    assert [entry["epoch"] for entry in record["epochs"]] == [0, 1, 2]  # 0: before training
    assert torch.equal(torch.tensor(record["epochs"][0]["student_logits"], dtype=torch.float32), before)
    assert torch.equal(torch.tensor(record["epochs"][2]["student_logits"], dtype=torch.float32),
                       student(images).detach())
    with Image.open(io.BytesIO(base64.b64decode(record["images"][1]["png"]))) as png:
        assert png.format == "PNG" and png.size == (8, 8)

    # A resumed process (same images, same T) keeps epochs 0-1 and records epoch 2 again; a run
    # with another T starts its record afresh.
    def reopen(T):
        pixels = [displayable(data.test[i][0], data.mean, data.std) for i in positions]
        return SoftTargetRecord(tmp_path, T, data.class_names, positions, record_labels(record), pixels,
                                stored_teacher)

    resumed = reopen(2.5)
    assert resumed.has_epoch(0) and resumed.has_epoch(2)
    resumed.add_epoch(2, torch.ones(2, 3))
    again = json.loads((tmp_path / SOFT_TARGETS_FILE).read_text())
    assert [entry["epoch"] for entry in again["epochs"]] == [0, 1, 2]
    assert again["epochs"][:2] == record["epochs"][:2] and again["epochs"][2]["student_logits"] == [[1.0] * 3] * 2
    resumed.add_epoch(1, torch.zeros(2, 3))  # epoch 2 of the earlier attempt is not this run's history
    assert [entry["epoch"] for entry in json.loads((tmp_path / SOFT_TARGETS_FILE).read_text())["epochs"]] == [0, 1]
    assert not reopen(4.0).has_epoch(0)


def record_labels(record: dict) -> list[int]:
    return [image["label"] for image in record["images"]]


# ---- the browser --------------------------------------------------------------------------------

def no_browser(reason: str):
    if os.environ.get("KDRUN_REQUIRE_BROWSER"):
        pytest.fail(f"KDRUN_REQUIRE_BROWSER is set but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        no_browser("playwright is not installed (pip install -e '.[test]')")
    candidates = [path for path in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser"),
                                    shutil.which("google-chrome")) if path]
    playwright = sync_playwright().start()
    failures = []
    for executable in [*dict.fromkeys(candidates), None]:  # None: a browser `playwright install` fetched
        try:
            launched = playwright.chromium.launch(executable_path=executable)
            break
        except Error as error:
            failures.append(f"{executable or 'playwright chromium'}: {str(error).splitlines()[0]}")
    else:
        playwright.stop()
        no_browser("no Chromium to drive (install Debian's `chromium` package): " + "; ".join(failures))
    yield launched
    launched.close()
    playwright.stop()


def open_page(browser, html: Path):
    """The page from file://, with every request it makes recorded: an offline page makes none but data:."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.requests, page.errors = [], []
    page.on("request", lambda request: page.requests.append(request.url))
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.goto(html.as_uri())
    return page


@pytest.fixture(scope="module")
def run_page(tmp_path_factory, run_kdrun, tiny_args):
    """One tiny distillation run through the real CLI, and `kdrun-report RUN_DIR` on it."""
    cwd = tmp_path_factory.mktemp("html")
    proc = run_kdrun([*tiny_args, *RUN_ARGS, "hydra.run.dir=run"], cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = cwd / "run"
    main([str(run_dir)])
    return run_dir, json.loads((run_dir / SOFT_TARGETS_FILE).read_text())


def bars(page, image: int, role: str) -> dict[int, float]:
    """Class -> the probability a panel's bar shows (its data-p attribute, the exact number)."""
    found = page.eval_on_selector_all(f'.sample[data-image="{image}"] [data-role="{role}"] .bar',
                                      "nodes => nodes.map(n => [n.dataset.class, n.dataset.p])")
    return {int(c): float(p) for c, p in found}


def shown_kl(page, image: int) -> float:
    return float(page.get_attribute(f'.sample[data-image="{image}"] .kl', "data-kl"))


def holder_state(page) -> tuple[float, int]:
    holder = page.locator(".soft")
    return float(holder.get_attribute("data-t")), int(holder.get_attribute("data-epoch"))


def assert_panels_at(page, record: dict, T: float) -> None:
    """Teacher at T=1, soft targets and the last epoch's student at T, and their KL, as Python computes them."""
    for i, image in enumerate(record["images"]):
        assert bars(page, i, "teacher") == pytest.approx(dict(enumerate(softmax(image["teacher_logits"], 1.0))),
                                                         abs=TOLERANCE)
        soft = softmax(image["teacher_logits"], T)
        assert bars(page, i, "soft") == pytest.approx(dict(enumerate(soft)), abs=TOLERANCE)
        student = softmax(record["epochs"][-1]["student_logits"][i], T)
        assert bars(page, i, "student") == pytest.approx(dict(enumerate(student)), abs=TOLERANCE)
        assert shown_kl(page, i) == pytest.approx(kl(soft, student), abs=TOLERANCE)


def test_the_run_wrote_its_logits_and_the_page_is_one_offline_file(run_page, browser):
    run_dir, record = run_page
    assert len(record["images"]) == 2 and len(record["class_names"]) == 10
    assert [entry["epoch"] for entry in record["epochs"]] == [0, 1, 2]
    assert all(len(row) == 10 for entry in record["epochs"] for row in entry["student_logits"])
    html = (run_dir / "report.html").read_text()
    assert 'src="http' not in html and 'href="http' not in html and "<link" not in html
    page = open_page(browser, run_dir / "report.html")
    assert page.errors == []
    assert all(url.startswith(("file:", "data:")) for url in page.requests), page.requests
    assert page.locator(".sample").count() == 2
    assert page.locator(".plot img").count() >= 1  # the report's plot, embedded
    page.close()


def test_t_slider_recomputes_the_soft_targets_from_the_teacher_logits(run_page, browser):
    _, record = run_page
    page = open_page(browser, run_page[0] / "report.html")
    T, epoch = holder_state(page)
    assert T == record["T"] and epoch == 2  # opens at the run's T and its last epoch
    slider = page.locator(".t-slider")
    slider.focus()
    for press in ("ArrowRight",) * 7 + ("ArrowLeft",) * 2:  # a user dragging it by keyboard: T 4 -> 4.7 -> 4.5
        page.keyboard.press(press)
    assert holder_state(page)[0] == pytest.approx(4.5, abs=1e-9)
    assert_panels_at(page, record, 4.5)
    page.locator(".t-number").fill("1.37")  # and typing an exact value
    assert holder_state(page)[0] == 1.37
    assert_panels_at(page, record, 1.37)
    assert "T=1.37" in page.locator('.sample[data-image="0"] .chart-title[data-role="soft"]').inner_text()
    page.locator(".t-reset").click()
    assert holder_state(page)[0] == record["T"]
    page.close()


def test_epoch_slider_shows_the_stored_student_of_each_epoch_and_play_runs_through_them(run_page, browser):
    _, record = run_page
    page = open_page(browser, run_page[0] / "report.html")
    T = record["T"]
    slider = page.locator(".epoch-slider")
    slider.focus()
    page.keyboard.press("Home")
    seen = []
    for index, entry in enumerate(record["epochs"]):
        if index:
            page.keyboard.press("ArrowRight")
        assert holder_state(page) == (T, entry["epoch"])
        for i, image in enumerate(record["images"]):
            student = softmax(entry["student_logits"][i], T)
            shown = bars(page, i, "student")
            assert shown == pytest.approx(dict(enumerate(student)), abs=TOLERANCE)
            assert shown_kl(page, i) == pytest.approx(kl(softmax(image["teacher_logits"], T), student), abs=TOLERANCE)
            seen.append(shown)
    assert seen[0] != seen[-2]  # training moved the student
    label = record["images"][0]["label"]
    true_bars = page.eval_on_selector_all('.sample[data-image="0"] .bar.true', "nodes => nodes.map(n => n.dataset.class)")
    assert true_bars == [str(label)] * 3  # the true class is marked in each panel

    page.keyboard.press("Home")
    page.locator(".play").click()  # from epoch 0 to the last one, then it stops
    page.wait_for_function("document.querySelector('.soft').dataset.epoch === '2'", timeout=10_000)
    assert "play" in page.locator(".play").inner_text()
    assert bars(page, 0, "student") == pytest.approx(dict(enumerate(
        softmax(record["epochs"][-1]["student_logits"][0], T))), abs=TOLERANCE)
    page.close()


def test_summary_table_sorts_by_a_column_and_links_each_run(tmp_path, browser):
    root = tmp_path / "sweep"
    for n, (T, top1) in enumerate([(1, 0.62), (2, 0.71), (4, 0.55)]):
        make_run(root, f"{n}_T={T}", [f"T={T}"], metrics(top1, T=float(T)))
    main([str(root)])
    page = open_page(browser, root / "report.html")
    assert page.errors == []

    def column(name):
        return page.eval_on_selector_all(
            "table.summary tbody tr", f"rows => rows.map(r => r.cells[{name}].textContent)")

    headers = page.eval_on_selector_all("table.summary thead th", "nodes => nodes.map(n => n.textContent)")
    best = headers.index("student best (%)")
    assert column(best) == ["62.00", "71.00", "55.00"]
    page.locator("table.summary th", has_text="student best").click()
    assert column(best) == ["55.00", "62.00", "71.00"]
    page.locator("table.summary th", has_text="student best").click()
    assert column(best) == ["71.00", "62.00", "55.00"] and column(0) == ["2", "1", "4"]
    page.locator("table.summary a", has_text="2_T=4").click()  # each row links to its run's section
    assert page.evaluate("location.hash") == "#run-2"
    section = page.locator("#run-2")
    assert "2_T=4" in section.locator("h3").inner_text()
    assert "no soft_targets.json" in section.inner_text()  # hand-made runs drew no figures
    page.close()
