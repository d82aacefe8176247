"""Tests for quantlab.viz: static figures are self-contained HTML with working Plotly controls, live
explorers recompute on every control change, reveal() collapses its answer."""

from __future__ import annotations

import json
import re

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from quantlab import viz


@pytest.fixture
def static(monkeypatch):
    monkeypatch.setenv(viz.STATIC_ENV, "1")


@pytest.fixture
def live(monkeypatch):
    monkeypatch.delenv(viz.STATIC_ENV, raising=False)


def _compute(n_bits, mode="sym"):
    """A small explorer state: a shared histogram, a grid that depends on n_bits, a mode-dependent title."""
    x = np.linspace(-1, 1, 50)
    fig = viz.new_figure(title=f"{n_bits} bits {mode}")
    fig.add_trace(viz.histogram_bars(x, np.linspace(-1, 1, 11), name="weights"))
    grid = np.arange(2**n_bits) / (2**n_bits - 1) * 2 - 1
    fig.add_trace(go.Scatter(x=grid, y=np.zeros_like(grid), mode="markers", name=f"grid {mode}"))
    fig.add_vline(x=0.5 if mode == "sym" else -0.5)
    fig.update_xaxes(range=[-1.2, 1.2])
    return fig


def _spec_from_html(html):
    """The data and layout passed to Plotly.newPlot in a static HTML fragment."""
    call = html[html.index("Plotly.newPlot(") :]
    decoder = json.JSONDecoder()
    pos = call.index("[")
    data, end = decoder.raw_decode(call, pos)
    pos = call.index("{", end)
    layout, _ = decoder.raw_decode(call, pos)
    return data, layout


@pytest.mark.parametrize(
    "value,expected", [("1", True), ("yes", True), ("0", False), ("false", False), ("", False)]
)
def test_is_static_reads_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv(viz.STATIC_ENV, value)
    assert viz.is_static() is expected


def test_is_static_is_false_when_unset(live):
    assert viz.is_static() is False


def test_template_and_new_figure():
    fig = viz.new_figure(2, 1, title="t", subplot_titles=("a", "b"), height=300)
    assert fig.layout.height == 300 and fig.layout.title.text == "t"
    assert list(fig.layout.template.layout.colorway) == list(viz.SEQUENCE)
    assert set(viz.COLORS) >= {"weights", "quantized", "error", "theory"}
    assert viz.LABELS["sqnr"] == "SQNR (dB)"


def test_histogram_bars_bins_like_numpy():
    values = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    edges = np.linspace(-4, 4, 17)
    bar = viz.histogram_bars(values, edges, name="w")
    counts, _ = np.histogram(values.numpy(), bins=edges)
    np.testing.assert_array_equal(np.asarray(bar.y), counts)
    np.testing.assert_allclose(np.asarray(bar.x), (edges[:-1] + edges[1:]) / 2, rtol=1e-6)
    dens = viz.histogram_bars(values, edges, name="w", density=True)
    assert float(np.sum(np.asarray(dens.y) * np.diff(edges))) == pytest.approx(1.0, rel=1e-5)


def test_static_html_is_self_contained_and_deterministic():
    html = viz.to_static_html(_compute(3))
    assert "Plotly.newPlot" in html
    assert "<script src" not in html and "cdn" not in html.lower() and "require(" not in html
    assert html == viz.to_static_html(_compute(3)), "re-executing must give identical output"
    assert re.search(r'id="ql-[0-9a-f]{12}"', html)
    assert "height:420px" in html.replace(" ", "")


def test_show_emits_html_in_static_mode_and_plotly_json_live(monkeypatch):
    shown = []
    import IPython.display

    monkeypatch.setattr(IPython.display, "display", lambda obj, raw=False: shown.append((obj, raw)))
    monkeypatch.setenv(viz.STATIC_ENV, "1")
    viz.show(_compute(2))
    assert isinstance(shown[-1][0], IPython.display.HTML) and "Plotly.newPlot" in shown[-1][0].data
    monkeypatch.delenv(viz.STATIC_ENV)
    viz.show(_compute(2))
    bundle, raw = shown[-1]
    assert raw and bundle["application/vnd.plotly.v1+json"]["layout"]["title"]["text"] == "2 bits sym"
    with pytest.raises(TypeError, match="plotly.graph_objects.Figure"):
        viz.show({"data": []})


# -----------------------------------------------------------------------------
# Explorer, static


def test_explorer_with_one_parameter_uses_pure_plotly_update_steps():
    ex = viz.explorer(_compute, {"n_bits": [2, 3, 4]}, initial={"n_bits": 3})
    fig, script = ex.static_figure()
    assert script is None
    traces = fig["data"]
    # the histogram is identical in every state, so it is stored once: 1 + 3 grids
    assert len(traces) == 4
    (slider,) = fig["layout"]["sliders"]
    assert slider["active"] == 1 and [s["label"] for s in slider["steps"]] == ["2", "3", "4"]
    for n_bits, step in zip([2, 3, 4], slider["steps"], strict=True):
        assert step["method"] == "update"
        visible, layout = step["args"]
        shown = [t for t, v in zip(traces, visible["visible"], strict=True) if v]
        assert [t["name"] for t in shown] == ["weights", "grid sym"]
        grid_trace = shown[1]
        assert len(_decode(grid_trace["x"])) == 2**n_bits
        assert layout["title.text"] == f"{n_bits} bits sym"
        assert layout["xaxis.range"] == [-1.2, 1.2] and len(layout["shapes"]) == 1
    assert [t["visible"] for t in traces] == [True, False, True, False]


def _decode(arr):
    if isinstance(arr, dict):  # plotly's base64 typed array
        import base64

        return np.frombuffer(base64.b64decode(arr["bdata"]), dtype=np.dtype(arr["dtype"]))
    return np.asarray(arr)


def test_explorer_with_two_parameters_combines_controls_in_a_script():
    ex = viz.explorer(_compute, {"n_bits": [2, 3], "mode": ["sym", "asym"]}, labels={"n_bits": "bits"})
    fig, script = ex.static_figure()
    assert fig["layout"]["sliders"][0]["currentvalue"]["prefix"] == "bits = "
    (menu,) = fig["layout"]["updatemenus"]
    assert [b["label"] for b in menu["buttons"]] == ["sym", "asym"]
    assert all(b["method"] == "skip" for b in menu["buttons"])
    assert all(s["method"] == "skip" for s in fig["layout"]["sliders"][0]["steps"])
    spec = json.loads(script[script.index("var S = ") + 8 : script.index(";\n", script.index("var S = "))])
    assert spec["dims"] == [2, 2] and len(spec["combos"]) == 4
    names = [[fig["data"][i]["name"] for i in combo] for combo in spec["combos"]]
    assert names == [["weights", "grid sym"], ["weights", "grid asym"]] * 2
    assert [lay["title.text"] for lay in spec["layouts"]] == [
        "2 bits sym",
        "2 bits asym",
        "3 bits sym",
        "3 bits asym",
    ]
    assert spec["dim_of"] == {"ql-0": 0, "ql-1": 1}
    assert fig["layout"]["sliders"][0]["name"] == "ql-0" and menu["name"] == "ql-1"
    html = ex.static_html()
    assert "plotly_sliderchange" in html and "plotly_buttonclicked" in html and "{plot_id}" not in html
    data, layout = _spec_from_html(html)
    assert len(data) == len(fig["data"]) and layout["updatemenus"][0]["active"] == 0


def test_buttons_sit_below_the_title():
    ex = viz.explorer(_compute, {"n_bits": [2, 3], "mode": ["sym", "asym"]})
    fig, _ = ex.static_figure()
    title, (menu,) = fig["layout"]["title"], fig["layout"]["updatemenus"]
    assert title["text"] == "2 bits sym"
    assert (title["yref"], title["y"], title["yanchor"]) == ("container", 1.0, "top")
    # the buttons hang above the plot area by their pad; the title needs ~40 px above them
    assert fig["layout"]["margin"]["t"] >= menu["pad"]["b"] + 40


def test_explorer_validates_its_arguments():
    with pytest.raises(ValueError, match="non-empty dict"):
        viz.explorer(_compute, {})
    with pytest.raises(ValueError, match="non-empty list"):
        viz.explorer(_compute, {"n_bits": "234"})
    with pytest.raises(ValueError, match="more than max_states=3"):
        viz.explorer(_compute, {"n_bits": [2, 3], "mode": ["sym", "asym"]}, max_states=3)
    with pytest.raises(ValueError, match="is not one of"):
        viz.explorer(_compute, {"n_bits": [2, 3]}, initial={"n_bits": 5})
    with pytest.raises(ValueError, match="unknown parameters"):
        viz.explorer(_compute, {"n_bits": [2, 3]}, initial={"bits": 2})
    with pytest.raises(TypeError, match="callable"):
        viz.explorer(None, {"n_bits": [2]})
    with pytest.raises(TypeError, match="must return a plotly"):
        viz.explorer(lambda n_bits: None, {"n_bits": [2]}).figure()


def test_explorer_displays_static_html_in_static_mode(static):
    bundle = viz.explorer(_compute, {"n_bits": [2, 3]})._repr_mimebundle_()
    assert set(bundle) == {"text/html", "text/plain"} and "Plotly.newPlot" in bundle["text/html"]


# -----------------------------------------------------------------------------
# Explorer, live


def test_live_explorer_recomputes_on_every_control_change(live):
    calls = []

    def compute(n_bits, mode):
        calls.append((n_bits, mode))
        return _compute(n_bits, mode)

    ex = viz.explorer(
        compute, {"n_bits": [2, 3, 4], "mode": ["sym", "asym"]}, initial={"n_bits": 3}, title="T"
    )
    bundle = ex._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    import ipywidgets

    assert isinstance(ex.controls["n_bits"], ipywidgets.SelectionSlider)
    assert isinstance(ex.controls["mode"], ipywidgets.ToggleButtons)
    assert calls == [(3, "sym")]
    ex.set(n_bits=4)
    ex.set(mode="asym")
    ex.set(n_bits=3, mode="sym")  # back to the first state: served from the cache
    assert calls == [(3, "sym"), (4, "sym"), (4, "asym"), (3, "asym")]
    assert len(ex.timings_ms) >= 4 and all(t >= 0 for t in ex.timings_ms)
    with pytest.raises(ValueError, match="not a live control"):
        ex.set(nope=1)


def test_live_explorer_skips_controls_for_single_values(live):
    ex = viz.explorer(_compute, {"n_bits": [2, 3], "mode": ["sym"]})
    ex.widget()
    assert list(ex.controls) == ["n_bits"]


# -----------------------------------------------------------------------------
# reveal


def test_reveal_static_is_a_collapsed_details_element(static):
    r = viz.reveal("Why `x < y`?", "Because **bits**.\n\nSecond <para>.")
    html = r._repr_mimebundle_()["text/html"]
    assert html.startswith('<details class="quantlab-reveal"') and "<summary" in html and " open" not in html
    assert "<code>x &lt; y</code>" in html and "<b>bits</b>" in html and "&lt;para&gt;" in html
    assert html.count("<p>") == 2


def test_reveal_live_is_a_button(live):
    r = viz.reveal("Q?", "A.")
    box = r.widget()
    question, button, answer = box.children
    assert answer.layout.display == "none"
    button.value = True
    assert answer.layout.display == "block" and button.description == "Hide answer"
    button.value = False
    assert answer.layout.display == "none"
    assert "application/vnd.jupyter.widget-view+json" in r._repr_mimebundle_()


def test_reveal_rejects_empty_text():
    with pytest.raises(ValueError, match="answer must be a non-empty string"):
        viz.reveal("Q?", " ")
