"""The status display: live widget, static HTML/text, loss curve, overview tables (SPEC §6)."""

from __future__ import annotations

import re
import time
import xml.etree.ElementTree as ET

import ipywidgets
import pytest
from IPython.core.displaypub import CapturingDisplayPublisher
from IPython.core.interactiveshell import InteractiveShell

from dreamer_magic import widgets
from dreamer_magic.status import (
    FAILED,
    INTERRUPTED,
    LOADED,
    RAN,
    RESTORED,
    RUNNING,
    WAITING,
    CheckpointInfo,
    OutputInfo,
    Status,
    resumed_from,
)
from dreamer_magic.widgets import (
    WIDGET_MIME,
    LiveStatus,
    StatusView,
    TextStatus,
    display_status,
    human_duration,
    human_size,
    loss_svg,
    render_overview,
    render_why,
    status_html,
    status_text,
)

SVG_NS = "{http://www.w3.org/2000/svg}"
ALL_STATES = [
    RUNNING, WAITING, RAN, LOADED, RESTORED, FAILED, INTERRUPTED, resumed_from("checkpoint-300")
]


def a_step(**kw) -> Status:
    s = Status(kind="step", name="clean-reviews", started=time.time() - 1.0)
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def a_trainer(n_losses: int = 25, **kw) -> Status:
    now = time.time()
    s = Status(
        kind="trainer",
        name="tiny-gpt",
        state=resumed_from("checkpoint-200"),
        step=240,
        max_steps=400,
        eta=125.0,
        losses=[(10 * i, 3.0 / (i + 1)) for i in range(n_losses)],
        checkpoints=[
            CheckpointInfo("checkpoint-100", 100, now - 300, 12_000_000),
            CheckpointInfo("checkpoint-200", 200, now - 200, 12_000_000),
            CheckpointInfo("checkpoint-300", 300, now - 100, 4_000, complete=False),
        ],
        resumed_from="checkpoint-200",
        skipped_checkpoints=["checkpoint-300"],
        model_path="output/tiny-gpt/_model",
    )
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def html_of(view: StatusView) -> str:
    """All HTML the widget's children show."""
    parts = []

    def walk(w):
        if isinstance(w, ipywidgets.HTML):
            parts.append(w.value)
        for c in getattr(w, "children", ()):
            walk(c)

    walk(view)
    return "".join(parts)


def parse(fragment: str) -> ET.Element:
    """Parse generated HTML as XML: proves tags balance and attributes are quoted."""
    return ET.fromstring(f"<root>{fragment}</root>")


# -- human formatting ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, text",
    [(None, "?"), (0, "0 B"), (512, "512 B"), (999, "999 B"), (1000, "1.0 KB"),
     (1_234_567, "1.2 MB"), (9_960, "10 KB"), (340_000_000, "340 MB"), (999_999, "1.0 MB"),
     (2.5e12, "2.5 TB")],
)
def test_human_size(n, text):
    assert human_size(n) == text


@pytest.mark.parametrize(
    "s, text",
    [(None, "?"), (float("nan"), "?"), (0, "0 ms"), (0.0001, "<1 ms"), (0.012, "12 ms"),
     (0.038, "38 ms"),
     (0.9996, "1.0 s"), (3.4, "3.4 s"), (42.4, "42 s"), (59.6, "1 min"), (125, "2 min 5 s"),
     (3599.6, "1 h"), (7500, "2 h 5 min"), (3 * 86400 + 7200, "3 d 2 h")],
)
def test_human_duration(s, text):
    assert human_duration(s) == text


# -- plain text --------------------------------------------------------------------------------


def test_text_first_line_reads_like_a_sentence():
    s = a_step(
        state=LOADED, duration=0.038, saved=4.2,
        outputs=[OutputInfo("reviews", "pandas.DataFrame", "dataset", 1_234_567)],
    )
    assert status_text(s) == (
        "[dreamer] step clean-reviews: loaded from disk in 38 ms (saved 4.2 s)"
        " — outputs: reviews (pandas.DataFrame, dataset, 1.2 MB)"
    )


@pytest.mark.parametrize("state", ALL_STATES)
def test_text_every_state(state):
    error = "ValueError: bad" if state == FAILED else None
    s = a_step(state=state, reasons=["input `raw` changed"], error=error)
    text = status_text(s)
    assert text.startswith(f"[dreamer] step clean-reviews: {state}")
    assert "why: input `raw` changed" in text
    if state == FAILED:
        assert "error: ValueError: bad" in text


def test_text_timing_words():
    assert "ran in 3.4 s" in status_text(a_step(state=RAN, duration=3.4))
    assert "failed after 2.0 s" in status_text(a_step(state=FAILED, duration=2.0))
    assert "interrupted after 2 min 5 s" in status_text(a_step(state=INTERRUPTED, duration=125))
    assert re.search(r"running for 1\.\d s", status_text(a_step(state=RUNNING)))


def test_text_cache_and_notes():
    s = a_step(
        state=RAN, duration=1, cache={"llama-3b": [8, 2], "embed": [0, 0]}, notes=["pickled: model"]
    )
    text = status_text(s)
    assert "llama-3b: 8 hits, 2 misses (80% hits)" in text
    assert "embed: 0 hits, 0 misses (– hits)" in text
    assert "note: pickled: model" in text


def test_text_trainer():
    text = status_text(a_trainer())
    assert text.startswith("[dreamer] trainer tiny-gpt: resumed from checkpoint-200")
    assert "step 240/400 (60%), ETA 2 min 5 s" in text
    assert "loss 0.12 at step 240" in text
    assert "checkpoint-300 (incomplete)" in text
    assert "skipped checkpoints (incomplete or corrupt): checkpoint-300" in text
    assert "model: output/tiny-gpt/_model" in text


# -- static HTML -------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ALL_STATES)
def test_html_state_badge(state):
    root = parse(status_html(a_step(state=state, duration=1.0)))
    card = root.find("div")
    assert card.get("class") == "dreamer-status"
    assert card.get("data-state") == state and card.get("data-kind") == "step"
    badge = root.find(".//span[@class='dreamer-state']")
    assert badge.get("data-state") == state and badge.text == state


def test_html_badge_colours_by_meaning():
    colour = badge_style
    assert widgets.GREEN in colour(LOADED) and widgets.GREEN in colour(RESTORED)
    assert widgets.BLUE in colour(RAN) and widgets.BLUE in colour(resumed_from("checkpoint-1"))
    assert widgets.ORANGE in colour(INTERRUPTED) and widgets.RED in colour(FAILED)


def badge_style(state: str) -> str:
    root = parse(status_html(a_step(state=state)))
    return root.find(".//span[@class='dreamer-state']").get("style")


def test_html_escapes_user_text():
    evil = "<script>alert('x')</script>"
    s = a_step(
        name=evil, state=FAILED, error=f"boom {evil}", reasons=[f"input `{evil}` changed"],
        notes=[evil], outputs=[OutputInfo(evil, evil, "pickle", 1)], cache={evil: [1, 1]},
    )
    out = status_html(s)
    assert "<script>" not in out
    root = parse(out)  # still well-formed
    assert root.find("div").get("data-name") == evil  # attribute round-trips through escaping
    view = StatusView(s, interval=0)
    assert "<script>" not in html_of(view)
    assert "<script>" not in render_why(evil, [evil]).html
    assert "<script>" not in render_overview([{"name": evil, "state": evil}], [{"name": evil}]).html


def test_html_reasons_outputs_cache():
    s = a_step(
        state=RAN, duration=4.2, reasons=["input `raw` changed", "code changed: lines 2-3"],
        outputs=[OutputInfo("reviews", "pandas.DataFrame", "dataset", 1_234_567),
                 OutputInfo("vocab", "dict", "json", 2_000)],
        cache={"llama-3b": [3, 1]},
    )
    root = parse(status_html(s))
    assert root.find(".//div[@class='dreamer-reasons']//code").text == "raw"
    names = [e.get("data-name") for e in root.iter("span") if e.get("class") == "dreamer-output"]
    assert names == ["reviews", "vocab"]
    db = root.find(".//span[@class='dreamer-cache-db']")
    assert (db.get("data-db"), db.get("data-hits"), db.get("data-misses")) == ("llama-3b", "3", "1")
    text = "".join(root.itertext())
    for fact in ("1.2 MB", "75%", "code changed: lines 2-3", "total 1.2 MB"):
        assert fact in text


def test_html_trainer():
    root = parse(status_html(a_trainer()))
    progress = root.find(".//div[@class='dreamer-progress']")
    assert (progress.get("data-step"), progress.get("data-max-steps")) == ("240", "400")
    assert root.find(f".//{SVG_NS}svg") is not None
    cps = {
        e.get("data-name"): e.get("data-complete")
        for e in root.iter("span")
        if e.get("class") == "dreamer-checkpoint"
    }
    assert cps == {"checkpoint-100": "true", "checkpoint-200": "true", "checkpoint-300": "false"}
    text = "".join(root.itertext())
    assert "incomplete" in text and "← resumed" in text and "ETA 2 min 5 s" in text
    assert root.find(".//code[@class='dreamer-resumed-from']").text == "checkpoint-200"
    assert root.find(".//code[@class='dreamer-model-path']").text == "output/tiny-gpt/_model"
    assert "checkpoint-300" in "".join(root.find(".//div[@class='dreamer-skipped']").itertext())


# -- loss curve --------------------------------------------------------------------------------


def polyline_points(svg: str) -> list[tuple[float, float]]:
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG_NS}svg"
    line = root.find(f"{SVG_NS}polyline")
    return [tuple(map(float, p.split(","))) for p in line.get("points").split()]


def test_loss_svg_is_valid_with_n_points():
    losses = [(i, 1.0 / (i + 1)) for i in range(50)]
    svg = loss_svg(losses, width=300, height=100)
    pts = polyline_points(svg)
    assert len(pts) == 50
    assert all(0 <= x <= 300 and 0 <= y <= 100 for x, y in pts)
    assert pts[0][1] < pts[-1][1]  # falling loss: the line goes down (SVG y grows downwards)
    labels = [t.text for t in ET.fromstring(svg).iter(f"{SVG_NS}text")]
    assert {"loss", "step", "0", "49", "1", "0.02"} <= set(labels)


def test_loss_svg_edge_cases():
    assert loss_svg([]) == ""
    assert loss_svg([(1, float("nan")), (2, float("inf"))]) == ""
    one = ET.fromstring(loss_svg([(5, 0.5)]))
    assert one.find(f"{SVG_NS}circle") is not None  # a single point is still visible
    flat = loss_svg([(1, 2.0), (2, 2.0), (3, float("nan"))])
    assert len(polyline_points(flat)) == 2  # a flat curve draws; NaN is dropped
    many = [(i, (i % 7) / 7) for i in range(10_000)]
    pts = polyline_points(loss_svg(many, max_points=200))
    assert len(pts) == 200


# -- live widget -------------------------------------------------------------------------------


def test_view_shows_the_facts():
    s = a_step(
        state=LOADED, duration=0.038, saved=4.2, reasons=["input `raw` changed"],
        outputs=[OutputInfo("reviews", "pandas.DataFrame", "dataset", 1_234_567)],
        cache={"llama-3b": [8, 2]}, notes=["replayed 2 outputs"],
    )
    view = StatusView(s, interval=0)
    assert isinstance(view, ipywidgets.VBox)
    assert view.children == (view.header, view.details)  # no progress row for a step
    assert "dreamer-status" in view._dom_classes
    assert 'data-state="loaded from disk"' in view.header.value
    assert "clean-reviews" in view.header.value and "38 ms" in view.header.value
    assert "saved 4.2 s" in view.header.value
    body = view.details.value
    facts = ("<code", "raw", "reviews", "pandas.DataFrame", "1.2 MB", "llama-3b", "80%", "replayed")
    for fact in facts:
        assert fact in body
    assert widgets.GREEN in view.layout.border_left


def test_view_updates_on_change():
    s = a_step()
    view = StatusView(s, interval=0)
    assert 'data-state="running"' in view.header.value
    s.state, s.duration = RAN, 3.4
    s.changed()
    assert 'data-state="ran"' in view.header.value and "in 3.4 s" in view.header.value
    s.count_cache("llama-3b", 5, 5)
    assert "50%" in view.details.value
    s.state, s.error = FAILED, "ZeroDivisionError: division by zero"
    s.changed()
    assert "dreamer-error" in view.details.value and widgets.RED in view.layout.border_left


def test_view_throttles_but_shows_the_final_state():
    s = a_step()
    view = StatusView(s, interval=0.1)
    start = view.refresh_count
    for i in range(200):
        s.count_cache("db", 1, 0)
    assert view.refresh_count - start <= 3  # a burst of 200 changes is not 200 redraws
    deadline = time.time() + 5
    while 'data-hits="200"' not in view.details.value and time.time() < deadline:
        time.sleep(0.02)
    assert 'data-hits="200"' in view.details.value  # the trailing refresh shows the last change


def test_view_finish_flushes_pending_change():
    s = a_step()
    view = StatusView(s, interval=60)
    s.state = RAN
    s.changed()
    assert 'data-state="running"' in view.header.value  # held back by the throttle
    view.finish()
    assert 'data-state="ran"' in view.header.value
    assert view._timer is None


def test_trainer_view_progress_and_curve():
    s = a_trainer(n_losses=12)
    view = StatusView(s, interval=0)
    assert view.progress_row in view.children
    assert isinstance(view.progress, ipywidgets.IntProgress)
    assert (view.progress.value, view.progress.max) == (240, 400)
    assert view.progress_row.layout.display is None
    assert "ETA 2 min 5 s" in view.progress_label.value and "loss" in view.progress_label.value
    svg = parse(view.details.value).find(f".//div[@class='dreamer-loss-curve']/{SVG_NS}svg")
    assert len(polyline_points(ET.tostring(svg, encoding="unicode"))) == 12
    assert "checkpoint-200" in view.details.value and "incomplete" in view.details.value
    s.step, s.state, s.duration = 400, RAN, 60.0
    s.losses.append((400, 0.05))
    s.changed()
    assert view.progress.value == 400 and view.progress.bar_style == "success"
    assert len(polyline_points(loss_svg(s.losses))) == 13


def test_trainer_view_hides_progress_until_known():
    s = Status(kind="trainer", name="t")
    view = StatusView(s, interval=0)
    assert view.progress_row.layout.display == "none"
    s.step, s.max_steps = 0, 10
    s.changed()
    assert view.progress_row.layout.display is None and view.progress.bar_style == "info"
    s.state = INTERRUPTED
    s.changed()
    assert view.progress.bar_style == "warning"


def test_mimebundle_has_widget_text_and_html():
    s = a_trainer(duration=60.0)
    view = StatusView(s, interval=0)
    bundle = view._repr_mimebundle_()
    assert bundle[WIDGET_MIME]["model_id"] == view.model_id
    assert bundle["text/plain"] == status_text(s)
    assert bundle["text/html"] == status_html(s)
    assert "<svg" in bundle["text/html"]


# -- display_status ----------------------------------------------------------------------------


@pytest.fixture
def ip():
    shell = InteractiveShell.instance()
    return shell


def test_display_status_in_plain_shell_prints_text_once(ip, capsys):
    assert not widgets.widgets_supported()
    s = a_step()
    handle = display_status(s)
    assert isinstance(handle, TextStatus)
    assert capsys.readouterr().out == ""  # nothing until the cell ends
    s.state, s.duration = RAN, 1.5
    handle.finish()
    handle.finish()
    assert capsys.readouterr().out == "[dreamer] step clean-reviews: ran in 1.5 s\n"


def test_text_status_says_early_that_it_waits(ip, capsys):
    s = a_step()
    handle = display_status(s, live=False)
    s.state = WAITING
    s.changed()
    s.changed()
    assert capsys.readouterr().out == "[dreamer] step clean-reviews: waiting for another kernel …\n"
    s.state, s.duration, s.saved = LOADED, 0.01, 3.0
    handle.finish()
    assert capsys.readouterr().out.startswith("[dreamer] step clean-reviews: loaded from disk in 10 ms")


def test_display_status_live_publishes_widget_and_final_state(ip, monkeypatch):
    pub = CapturingDisplayPublisher()
    monkeypatch.setattr(ip, "display_pub", pub)
    s = a_step()
    with display_status(s, live=True, interval=60) as handle:
        assert isinstance(handle, LiveStatus)
        first = pub.outputs[0]
        assert WIDGET_MIME in first["data"] and "running" in first["data"]["text/plain"]
        s.state, s.duration = LOADED, 0.02
        s.changed()
    assert 'data-state="loaded from disk"' in handle.view.header.value  # finish() flushed
    last = pub.outputs[-1]
    assert last["update"] is True
    assert last["transient"]["display_id"] == first["transient"]["display_id"]
    assert "loaded from disk in 20 ms" in last["data"]["text/plain"]
    assert 'data-state="loaded from disk"' in last["data"]["text/html"]


# -- %dreamer status / why ---------------------------------------------------------------------


def test_render_overview():
    rows = [
        {"name": "clean-reviews", "kind": "step", "state": "complete", "size": 1_234_567,
         "backups": 2, "fingerprint": "0123456789abcdef0123", "created": "2024-05-01T12:03:04"},
        {"name": "tiny-gpt", "kind": "trainer", "state": "incomplete", "size": None, "backups": 0,
         "fingerprint": "", "created": time.time()},
    ]
    caches = [
        {"name": "llama-3b-ab12", "rows": 120, "size": 40_960, "hits": 90, "misses": 30,
         "hit_rate": 0.75},
        {"name": "embed", "rows": 0, "size": 0, "hits": 0, "misses": 0},
    ]
    r = render_overview(rows, caches, folder="output")
    lines = r.text.splitlines()
    assert lines[0] == "dreamer output folder output"
    header = next(line for line in lines if line.startswith("name"))
    assert header.split() == ["name", "kind", "state", "size", "backups", "fingerprint", "created"]
    row = next(line for line in lines if line.startswith("clean-reviews"))
    expected = ["clean-reviews", "step", "complete", "1.2", "MB", "2", "0123456789ab"]
    assert row.split()[:7] == expected
    assert "2024-05-01 12:03:04" in row
    cache_line = next(line for line in lines if line.startswith("llama-3b-ab12"))
    assert cache_line.split() == ["llama-3b-ab12", "120", "41", "KB", "90", "30", "75%"]
    assert next(line for line in lines if line.startswith("embed")).split()[-1] == "–"
    root = parse(r.html)
    states = [e.get("data-state") for e in root.iter("span") if e.get("class") == "dreamer-state"]
    assert states == ["complete", "incomplete"]
    assert root.find(".//table[@class='dreamer-caches']") is not None
    bundle = r._repr_mimebundle_()
    assert bundle == {"text/plain": r.text, "text/html": r.html} and str(r) == r.text


def test_render_overview_empty():
    r = render_overview([], [])
    assert "no steps or trainers yet" in r.text and "no steps or trainers yet" in r.html
    parse(r.html)


def test_render_why():
    r = render_why("clean-reviews", ["input `raw` changed", "code changed: lines 2-3"])
    assert r.text == "why clean-reviews:\n  - input `raw` changed\n  - code changed: lines 2-3"
    root = parse(r.html)
    items = ["".join(li.itertext()) for li in root.iter("li")]
    assert items == ["input raw changed", "code changed: lines 2-3"]
    assert root.find(".//li/code").text == "raw"
    assert "nothing changed" in render_why("x", []).text


# -- the live card's clock, the body's progress, the final static card ---------------------------


def wait_for(predicate, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)
    return predicate()


def test_clock_moves_the_elapsed_time_while_running_and_stops_on_finish():
    s = a_step()  # started a second ago, running
    view = StatusView(s, interval=60)
    assert "for 1.0 s" in view.header.value
    s.started -= 125  # as if two minutes passed with no change from the core
    view.tick()
    assert "for 2 min 6 s" in view.header.value
    view.start_clock(every=0.02)
    assert view.ticking
    s.started -= 3600
    assert wait_for(lambda: "for 1 h 2 min" in view.header.value), view.header.value
    s.state, s.duration = RAN, 3.4
    view.finish()
    assert not view.ticking and "in 3.4 s" in view.header.value


def test_clock_stops_by_itself_once_the_status_is_no_longer_running():
    s = a_step()
    view = StatusView(s, interval=0)
    view.start_clock(every=0.02)
    s.state, s.duration = LOADED, 0.01
    assert wait_for(lambda: not view.ticking)
    view.finish()


def test_tick_reads_a_tqdm_bar_made_in_the_body_and_shows_an_eta():
    import io

    from tqdm import tqdm

    s = a_step(started=time.time() - 30)
    view = StatusView(s, interval=0)
    old = tqdm(total=10, file=io.StringIO(), desc="made before the cell")
    old.start_t = s.started - 100  # a bar of an earlier cell does not count
    bar = tqdm(total=100, file=io.StringIO(), desc="tokenize", mininterval=0)
    try:
        bar.start_t -= 10  # ten seconds in
        bar.update(40)
        view.tick()
        assert s.progress is not None and (s.progress.what, s.progress.done, s.progress.total) == ("tokenize", 40, 100)
        assert s.progress.eta == pytest.approx(15, rel=0.2)  # 60 left at 4 per second
        assert "tokenize 40/100 (40%), ETA 1" in view.details.value
        assert "progress: tokenize 40/100 (40%)" in status_text(s)
    finally:
        bar.close()
        old.close()
    view.tick()
    assert s.progress is None and "tokenize" not in view.details.value
    s.state, s.duration = RAN, 12.0
    view.finish()
    assert "progress" not in status_text(s)


def test_a_finished_live_card_becomes_static_html_and_text(ip, monkeypatch):
    pub = CapturingDisplayPublisher()
    monkeypatch.setattr(ip, "display_pub", pub)
    s = a_step()
    handle = display_status(s, live=True, interval=60)
    first = pub.outputs[0]
    assert WIDGET_MIME in first["data"] and first["metadata"] == widgets.CARD_METADATA
    assert handle.view.ticking  # the clock runs while the cell does
    s.state, s.duration = RAN, 1.5
    handle.finish()
    last = pub.outputs[-1]
    assert last["update"] is True and last["transient"]["display_id"] == first["transient"]["display_id"]
    assert set(last["data"]) == {"text/plain", "text/html"}, "no widget: every reader shows the final card"
    assert last["data"] == widgets.static_bundle(s)
    assert last["metadata"] == widgets.CARD_METADATA
    assert not handle.view.ticking
    assert handle.view.comm is None and handle.view.header.comm is None  # closed: its job is done


def test_a_card_removed_by_clear_output_is_shown_again(ip, monkeypatch):
    pub = CapturingDisplayPublisher()
    monkeypatch.setattr(ip, "display_pub", pub)
    s = a_step()
    handle = display_status(s, live=True, interval=60, clock=None)
    handle.redisplay()
    assert len(pub.outputs) == 2 and WIDGET_MIME in pub.outputs[1]["data"]
    s.state, s.duration = RAN, 1.0
    handle.finish()
    assert pub.outputs[-1]["transient"]["display_id"] == pub.outputs[1]["transient"]["display_id"]


# -- validation loss, outputs, errors ----------------------------------------------------------


def test_loss_svg_draws_validation_loss_in_another_colour_with_a_legend():
    svg = loss_svg([(10, 2.0), (20, 1.5), (30, 1.2)], eval_losses=[(15, 2.2), (30, 1.6)])
    root = ET.fromstring(svg)
    lines = {p.get("class"): p for p in root.iter(f"{SVG_NS}polyline")}
    assert set(lines) == {"dreamer-loss-line", "dreamer-eval-line"}
    assert widgets.BLUE in lines["dreamer-loss-line"].get("style")
    assert widgets.ORANGE in lines["dreamer-eval-line"].get("style")
    assert len(lines["dreamer-eval-line"].get("points").split()) == 2
    legend = "".join(t.text or "" for t in root.iter(f"{SVG_NS}text"))
    assert "training" in legend and "validation" in legend
    assert root.get("data-eval-points") == "2"
    # the scale covers both curves: the highest label is the validation loss 2.2
    assert "2.2" in legend
    only_eval = ET.fromstring(loss_svg([], eval_losses=[(5, 1.0), (10, 0.8)]))
    assert [p.get("class") for p in only_eval.iter(f"{SVG_NS}polyline")] == ["dreamer-eval-line"]
    # without validation losses: one line, no legend (as before)
    plain = ET.fromstring(loss_svg([(1, 1.0), (2, 0.5)]))
    assert not any("validation" in (t.text or "") for t in plain.iter(f"{SVG_NS}text"))


def test_trainer_card_shows_validation_loss():
    s = a_trainer(n_losses=5, eval_losses=[(20, 1.9), (40, 1.4)], state=RAN, duration=9.0)
    text = status_text(s)
    assert "validation loss 1.4 at step 40" in text
    html = status_html(s)
    assert 'class="dreamer-eval-loss"' in html and "dreamer-eval-line" in html
    parse(html)
    view = StatusView(s, interval=0)
    assert "validation loss" in view.progress_label.value and "dreamer-eval-line" in view.details.value


def test_outputs_lead_with_what_matters_fold_temporaries_and_flag_pickles():
    s = a_step(
        state=RAN, duration=1.0,
        outputs=[
            OutputInfo("i", "int", "json", 1, temporary=True),
            OutputInfo("n_rows", "int", "json", 4),
            OutputInfo("_tmp", "str", "json", 12, temporary=True),
            OutputInfo("reviews", "datasets.Dataset", "dataset", 9_000_000),
            OutputInfo("model_cfg", "Config", "pickle", 300, pickled=True),
        ],
    )
    text = status_text(s)
    head = text.splitlines()[0]
    assert head.index("reviews") < head.index("model_cfg") < head.index("n_rows")
    assert " i (" not in head and "_tmp" not in head
    assert "  temporaries: i, _tmp (13 B)" in text
    assert "  pickled: model_cfg (loading a pickle runs code" in text
    html = status_html(s)
    root = parse(html)
    main = root.find(".//table[@class='dreamer-outputs']")
    assert [e.get("data-name") for e in main.iter("span") if e.get("class") == "dreamer-output"] == [
        "reviews", "model_cfg", "n_rows",
    ]
    folded = root.find(".//details[@class='dreamer-temporaries']")
    assert folded is not None and "2 temporaries" in "".join(folded.find("summary").itertext())
    pickled = [e for e in root.iter("span") if e.get("class") == "dreamer-pickled"]
    assert len(pickled) == 1 and "trust" in pickled[0].get("title")


def test_an_error_raised_below_the_card_is_named_once():
    s = a_step(state=FAILED, duration=0.2, error="ZeroDivisionError: division by zero")
    assert "error: ZeroDivisionError: division by zero" in status_text(s)  # nothing below: all of it
    s.error_shown_below = True
    text = status_text(s)
    assert "division by zero" not in text and "error: ZeroDivisionError (shown below)" in text
    assert "division by zero" not in status_html(s)


def test_overview_names_the_folder_and_says_which_counts_are_this_sessions():
    caches = [{"name": "llm", "rows": 10, "size": 4096, "hits": 3, "misses": 1}]
    r = render_overview([], caches, folder="/data/output")
    assert r.text.splitlines()[0] == "dreamer output folder /data/output"
    assert "hits, misses and hit rate: this kernel session" in r.text
    assert "this kernel session" in r.html and "/data/output" in r.html


def test_progress_reported_by_other_code_is_kept_by_the_clock():
    from dreamer_magic.status import Progress

    s = a_step()
    view = StatusView(s, interval=0)
    s.progress = Progress("generate", 3, 10, eta=7.0, source="generation")
    s.changed()
    view.tick()  # no tqdm bar: the generation batches' progress stays
    assert s.progress.what == "generate" and "generate 3/10 (30%), ETA 7.0 s" in view.details.value
    view.finish()


# -- a hit in a kernel: a static card, no ipywidgets; a miss: the card goes live above the body --


@pytest.mark.timeout(180)
def test_a_kernel_hit_shows_a_static_card_and_a_miss_goes_live_before_its_body(tmp_path):
    """In a real ipykernel: a hit shows its card as static text/HTML, above what it replays,
    and never imports ipywidgets (about 40 ms of CPU on the hit path); a miss shows the live
    widget before the body's first output, and it ends static."""
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3", cwd=str(tmp_path), startup_timeout=90)
    try:
        def run(code: str) -> list[dict]:
            messages: list[dict] = []
            reply = kc.execute_interactive(code, timeout=60, output_hook=messages.append)
            errors = [m["content"] for m in messages if m["msg_type"] == "error"]
            assert reply["content"]["status"] == "ok", errors
            return [m for m in messages if m["msg_type"] in ("stream", "display_data", "update_display_data")]

        def is_card(m: dict) -> bool:
            return "display" in m["msg_type"] and "dreamer_magic" in (m["content"].get("metadata") or {})

        def live(m: dict) -> bool:
            return WIDGET_MIME in m["content"]["data"]

        run("%load_ext dreamer_magic\n%dreamer output out\n%config DreamerMagics.widgets = False")
        run("%%dreamer_step first\nx = 1\nprint('body of first')")  # saved with the text status
        run("%config DreamerMagics.widgets = True")
        hit = run("%%dreamer_step first\nx = 1\nprint('body of first')")
        cards = [m for m in hit if is_card(m)]
        assert cards and not any(live(m) for m in cards), "a hit's card is static"
        assert cards[0]["msg_type"] == "display_data" and hit[0] is cards[0], "the card comes first"
        assert cards[-1]["content"]["data"]["text/plain"].startswith("[dreamer] step first: loaded from disk")
        assert [m["content"]["text"] for m in hit if m["msg_type"] == "stream"] == ["body of first\n"]
        assert run("import sys; print('ipywidgets' in sys.modules)")[0]["content"]["text"] == "False\n"

        miss = run("%%dreamer_step second\nprint('body of second')")
        body = next(i for i, m in enumerate(miss) if m["msg_type"] == "stream" and "body of second" in m["content"]["text"])
        went_live = [i for i, m in enumerate(miss) if is_card(m) and live(m)]
        assert went_live and went_live[0] < body, "the live card is shown before the body's output"
        assert miss[0] is miss[went_live[0]], "the live card is the cell's first output"
        last = [m for m in miss if is_card(m)][-1]
        assert not live(last) and last["content"]["data"]["text/plain"].startswith("[dreamer] step second: ran")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
