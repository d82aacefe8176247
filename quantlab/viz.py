"""Figures that are live in a kernel and still interactive in the static book.

Every lab figure goes through this module, so that one notebook works in two places:

* **live** (a Jupyter kernel, ``QUANTLAB_STATIC`` unset): an :func:`explorer` is an ipywidgets UI; each
  slider move calls the lab's ``compute`` function again and redraws a Plotly figure (sent with
  Plotly's own mimetype, which JupyterLab renders with its bundled plotly.js).
* **static** (``QUANTLAB_STATIC=1``, set by the book build and ``make outputs``): there is no kernel
  behind the page, so every combination of the explorer's parameters is computed *once*, all traces
  go into a single Plotly figure, and Plotly's own ``sliders`` / ``updatemenus`` switch which traces
  are visible. The figure is emitted as an HTML ``<div>`` + ``<script>`` that calls ``Plotly.newPlot``;
  plotly.js itself is *not* included: the book loads it once per page (``_static/plotly.min.js``).

With one varying parameter the static controls are pure Plotly (``method="update"``). With two or
more, a slider step cannot know where the other controls stand, so the controls use
``method="skip"`` and a ~15-line script (``post_script``) combines their states and calls
``Plotly.update``; it needs nothing but plotly.js.

:func:`reveal` is the "predict before you run" pattern: a question whose answer stays hidden until
asked for: a button in a live kernel, an HTML ``<details>`` element in the book. ``<details>`` is
plain HTML5, so the same output also collapses when a committed notebook is opened in JupyterLab;
no Sphinx extension is needed (a markdown ``{dropdown}`` would render as a literal code block in
JupyterLab).

Colors, fonts and axis labels are defined once here (:data:`COLORS`, :data:`LABELS`,
:func:`template`) so that the same quantity looks the same in every lab.

References:
    Plotly "Sliders" and "Custom Buttons" documentation (``method`` = restyle / relayout / update /
    skip, the ``plotly_sliderchange`` and ``plotly_buttonclicked`` events).
    ipywidgets 8 documentation (``SelectionSlider``, ``ToggleButtons``, ``Output``).
"""

from __future__ import annotations

import functools
import hashlib
import html
import itertools
import json
import numbers
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

__all__ = [
    "COLORS",
    "LABELS",
    "SEQUENCE",
    "STATIC_ENV",
    "Explorer",
    "Reveal",
    "explorer",
    "histogram_bars",
    "is_static",
    "new_figure",
    "reveal",
    "show",
    "template",
    "to_static_html",
]

STATIC_ENV = "QUANTLAB_STATIC"

# One color per *role*, used by every lab: the real-valued data is always blue, what the quantizer
# produces always orange, errors always red, a prediction from theory always green.
COLORS: Mapping[str, str] = MappingProxyType(
    {
        "weights": "#4C72B0",  # real-valued data (weights, activations)
        "quantized": "#DD8452",  # grid points, dequantized values, codes
        "error": "#C44E52",  # quantization error
        "theory": "#55A868",  # predictions from the math (uniform +-s/2, 6 dB/bit)
        "accent": "#8172B3",  # a second method being compared
        "muted": "#8C8C8C",  # reference lines, clipped regions
    }
)
SEQUENCE: tuple[str, ...] = (
    "#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C",
)  # fmt: skip

# Axis titles with their units, so "error" means the same thing (and unit) in every lab.
LABELS: Mapping[str, str] = MappingProxyType(
    {
        "weight": "weight value",
        "error": "error x̂ − x (weight units)",
        "abs_error": "|x̂ − x| (weight units)",
        "count": "count",
        "density": "density",
        "bits": "bits per weight",
        "n_bits": "bits per code",
        "sqnr": "SQNR (dB)",
        "mse": "mean squared error",
        "code": "integer code",
    }
)

_DEFAULT_HEIGHT = 420
_PLOTLY_CONFIG: Mapping[str, Any] = MappingProxyType({"displaylogo": False, "responsive": True})


def is_static() -> bool:
    """True when figures must be frozen into static HTML (env ``QUANTLAB_STATIC`` set and not 0/false)."""
    return os.environ.get(STATIC_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


# -----------------------------------------------------------------------------
# Look: one template for every figure


def template() -> go.layout.Template:
    """The quantlab Plotly template: white background, light grid, the :data:`SEQUENCE` colorway.

    It replaces Plotly's default template instead of extending it, which keeps every static figure
    ~8 KB smaller (the default template is embedded in each figure's JSON).
    """
    axis = {
        "showgrid": True, "gridcolor": "#E6E6E6", "zeroline": False, "linecolor": "#444", "ticks": "outside",
    }  # fmt: skip
    return go.layout.Template(
        layout={
            "font": {"family": "Helvetica, Arial, sans-serif", "size": 13, "color": "#222"},
            "colorway": list(SEQUENCE),
            "paper_bgcolor": "white",
            "plot_bgcolor": "white",
            "xaxis": axis,
            "yaxis": axis,
            "legend": {"bgcolor": "rgba(255,255,255,0.7)"},
            "margin": {"l": 60, "r": 20, "t": 60, "b": 50},
            "hoverlabel": {"namelength": -1},
            "bargap": 0.02,
        }
    )


@functools.lru_cache(maxsize=32)
def _base_figure(rows: int, cols: int, subplot_titles: tuple[str, ...] | None, kwargs: tuple) -> go.Figure:
    """An empty subplot grid in the template; cached because ``make_subplots`` costs ~10 ms, a big part
    of a live explorer update. Never handed out: :func:`new_figure` returns a copy."""
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=subplot_titles, **dict(kwargs))
    fig.update_layout(template=template())
    return fig


def new_figure(
    rows: int = 1,
    cols: int = 1,
    *,
    title: str | None = None,
    subplot_titles: Sequence[str] | None = None,
    height: int = _DEFAULT_HEIGHT,
    **subplot_kwargs: Any,
) -> go.Figure:
    """An empty figure (with subplots if ``rows * cols > 1``) in the quantlab template.

    Args:
        rows, cols: subplot grid.
        title: figure title.
        subplot_titles: one title per subplot.
        height: figure height in pixels (static figures need a fixed height).
        **subplot_kwargs: passed to ``plotly.subplots.make_subplots`` (e.g. ``vertical_spacing``).

    Returns:
        A new ``go.Figure`` (a copy of a cached grid when the arguments are hashable).
    """
    titles = tuple(subplot_titles) if subplot_titles is not None else None
    key = tuple(sorted(subplot_kwargs.items()))
    try:
        hash(key)
    except TypeError:  # e.g. specs=[[{...}]]: build it directly
        fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, **subplot_kwargs)
        fig.update_layout(template=template())
    else:
        fig = go.Figure(_base_figure(rows, cols, titles, key))  # a copy, subplot grid included
    fig.update_layout(height=height, title={"text": title or ""})
    return fig


def histogram_bars(
    values: Any,
    edges: Any,
    *,
    name: str,
    color: str = COLORS["weights"],
    density: bool = False,
    opacity: float = 0.75,
    **bar_kwargs: Any,
) -> go.Bar:
    """A histogram computed here (``numpy.histogram``) and drawn as bars.

    Binning in Python instead of with ``go.Histogram`` keeps static figures small (one number per
    bin instead of every sample) and makes identical histograms identical traces, which the static
    explorer stores only once.

    Args:
        values: samples, any shape (a tensor or array; flattened).
        edges: bin edges, shape ``(n_bins + 1,)``.
        name: legend name.
        color: bar color (default: the "weights" color).
        density: normalize to a probability density instead of counts.
        opacity: bar opacity.
        **bar_kwargs: passed to ``go.Bar``.

    Returns:
        A ``go.Bar`` trace with ``n_bins`` bars.
    """
    values = np.asarray(_to_numpy(values), dtype=np.float64).ravel()
    edges = np.asarray(_to_numpy(edges), dtype=np.float64)
    counts, edges = np.histogram(values, bins=edges, density=density)
    centers = 0.5 * (edges[:-1] + edges[1:])
    return go.Bar(
        x=centers.astype(np.float32),
        y=counts.astype(np.float32),
        width=np.diff(edges).astype(np.float32),
        name=name,
        marker={"color": color, "line": {"width": 0}},
        opacity=opacity,
        **bar_kwargs,
    )


def _to_numpy(x: Any) -> Any:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        return x.detach().cpu().numpy()
    return x


# -----------------------------------------------------------------------------
# Showing one figure


def _figure_json(fig: go.Figure | Mapping[str, Any]) -> dict[str, Any]:
    """The figure as a JSON-compatible dict (numpy arrays become Plotly's base64 typed arrays)."""
    return json.loads(pio.to_json(fig, validate=False, remove_uids=True))


def to_static_html(fig: go.Figure | Mapping[str, Any], *, post_script: str | None = None) -> str:
    """A ``<div>`` + ``<script>`` that draws ``fig`` with a page-level plotly.js (not included).

    The div id is a hash of the figure, so re-executing a notebook gives byte-identical output.

    Args:
        fig: a figure or a figure dict (``{"data": [...], "layout": {...}}``).
        post_script: JavaScript run after the plot is drawn; ``{plot_id}`` is replaced by the div id.

    Returns:
        An HTML fragment.
    """
    spec = _figure_json(fig)
    digest = hashlib.sha1(json.dumps(spec, sort_keys=True).encode() + (post_script or "").encode())
    height = spec.get("layout", {}).get("height") or _DEFAULT_HEIGHT
    return pio.to_html(
        spec,
        config=dict(_PLOTLY_CONFIG),
        include_plotlyjs=False,
        full_html=False,
        post_script=post_script,
        default_width="100%",
        default_height=f"{int(height)}px",
        validate=False,
        div_id=f"ql-{digest.hexdigest()[:12]}",
    )


def _live_bundle(fig: go.Figure) -> dict[str, Any]:
    """Plotly's mimetype bundle (rendered by JupyterLab's bundled plotly.js, no HTML, no CDN)."""
    spec = _figure_json(fig)
    spec["config"] = dict(_PLOTLY_CONFIG)
    title = spec.get("layout", {}).get("title", {}).get("text", "")
    return {"application/vnd.plotly.v1+json": spec, "text/plain": f"<quantlab figure: {title}>"}


def show(fig: go.Figure) -> None:
    """Display a figure: a static HTML div in book mode (:func:`is_static`), Plotly's mimetype live."""
    from IPython.display import HTML, display

    if not isinstance(fig, go.Figure):
        raise TypeError(f"fig must be a plotly.graph_objects.Figure, got {type(fig).__name__}")
    if is_static():
        display(HTML(to_static_html(fig)))
    else:
        display(_live_bundle(fig), raw=True)


# -----------------------------------------------------------------------------
# Explorer: one figure, a few parameters


def _is_numeric(values: Sequence[Any]) -> bool:
    return all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


# Combines the states of several static controls (each uses method="skip") and shows the matching
# precomputed traces. S.combos[k] lists the trace indices of combination k (row-major over dims).
_COMBINE_JS = """
(function () {
  var gd = document.getElementById('{plot_id}');
  var S = __SPEC__;
  function apply() {
    var k = 0;
    for (var d = 0; d < S.dims.length; d++) { k = k * S.dims[d] + S.state[d]; }
    var vis = new Array(S.n).fill(false);
    S.combos[k].forEach(function (i) { vis[i] = true; });
    Plotly.update(gd, {visible: vis}, S.layouts[k]);
  }
  gd.on('plotly_sliderchange', function (e) {
    if (e.slider.name in S.dim_of) { S.state[S.dim_of[e.slider.name]] = e.slider.active; apply(); }
  });
  gd.on('plotly_buttonclicked', function (e) {
    if (e.menu.name in S.dim_of) { S.state[S.dim_of[e.menu.name]] = e.active; apply(); }
  });
})();
"""

_AXIS_KEY = re.compile(r"^[xy]axis\d*$")


def _layout_update(layout: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a state's layout that may change between states (title, shapes, annotations, ranges)."""
    update: dict[str, Any] = {
        "title.text": layout.get("title", {}).get("text", ""),
        "shapes": layout.get("shapes", []),
        "annotations": layout.get("annotations", []),
    }
    for key, axis in layout.items():
        if _AXIS_KEY.match(key) and isinstance(axis, Mapping) and "range" in axis:
            update[f"{key}.range"] = axis["range"]
    return update


class Explorer:
    """A figure driven by a few discrete parameters; see :func:`explorer`.

    Displaying it (last expression of a cell) shows the live widget UI, or the static precomputed
    figure when :func:`is_static`. ``timings_ms`` records the kernel-side time of each live update
    (compute + serialization), the number behind "slider moves must feel instant".
    """

    def __init__(
        self,
        compute: Callable[..., go.Figure],
        params: Mapping[str, Sequence[Any]],
        *,
        title: str = "",
        initial: Mapping[str, Any] | None = None,
        labels: Mapping[str, str] | None = None,
        max_states: int = 256,
    ) -> None:
        if not callable(compute):
            raise TypeError(f"compute must be callable, got {type(compute).__name__}")
        if not isinstance(params, Mapping) or not params:
            raise ValueError(f"params must be a non-empty dict name -> list of values, got {params!r}")
        self.params: dict[str, list[Any]] = {}
        for name, values in params.items():
            if isinstance(values, str | bytes) or not isinstance(values, Sequence) or len(values) == 0:
                raise ValueError(f"params[{name!r}] must be a non-empty list of values, got {values!r}")
            self.params[name] = list(values)
        n_states = int(np.prod([len(v) for v in self.params.values()]))
        if n_states > max_states:
            sizes = {k: len(v) for k, v in self.params.items()}
            raise ValueError(
                f"params give {n_states} combinations {sizes}, more than max_states={max_states}; "
                "the static book precomputes every one: use fewer values"
            )
        initial = dict(initial or {})
        unknown = set(initial) - set(self.params)
        if unknown:
            raise ValueError(
                f"initial names unknown parameters {sorted(unknown)}; known: {list(self.params)}"
            )
        self.initial_index: dict[str, int] = {}
        for name, values in self.params.items():
            if name in initial:
                if initial[name] not in values:
                    raise ValueError(f"initial[{name!r}]={initial[name]!r} is not one of {values}")
                self.initial_index[name] = values.index(initial[name])
            else:
                self.initial_index[name] = 0
        self.compute = compute
        self.title = title
        self.labels = dict(labels or {})
        self.timings_ms: list[float] = []
        self._widget: Any = None
        self.controls: dict[str, Any] = {}
        self._cache: dict[tuple[int, ...], dict[str, Any]] = {}

    # -- one state --------------------------------------------------------

    def values_at(self, index: Sequence[int]) -> dict[str, Any]:
        """The parameter values of a state given as one index per parameter."""
        return {name: self.params[name][i] for name, i in zip(self.params, index, strict=True)}

    def figure(self, **values: Any) -> go.Figure:
        """Call ``compute`` for one state (missing parameters take their initial value)."""
        state = {name: self.params[name][i] for name, i in self.initial_index.items()}
        state.update(values)
        fig = self.compute(**state)
        if not isinstance(fig, go.Figure):
            raise TypeError(f"compute must return a plotly.graph_objects.Figure, got {type(fig).__name__}")
        if self.title and not fig.layout.title.text:
            fig.update_layout(title={"text": self.title})
        return fig

    def _label(self, name: str) -> str:
        return self.labels.get(name, name)

    # -- static: every state precomputed ---------------------------------

    def static_figure(self) -> tuple[dict[str, Any], str | None]:
        """All states in one figure dict with Plotly controls, and the combining script (or None).

        Identical traces (e.g. the weight histogram, the same in every state) are stored once.
        """
        names = list(self.params)
        dims = [len(self.params[n]) for n in names]
        varying = [d for d, n in enumerate(dims) if n > 1]
        traces: list[dict[str, Any]] = []
        trace_index: dict[str, int] = {}
        combos: list[list[int]] = []
        layouts: list[dict[str, Any]] = []
        base_layout: dict[str, Any] | None = None
        init_key = tuple(self.initial_index[n] for n in names)
        for key in itertools.product(*(range(n) for n in dims)):
            spec = _figure_json(self.figure(**self.values_at(key)))
            members = []
            for trace in spec.get("data", []):
                k = json.dumps(trace, sort_keys=True)
                if k not in trace_index:
                    trace_index[k] = len(traces)
                    traces.append(trace)
                members.append(trace_index[k])
            combos.append(members)
            layouts.append(_layout_update(spec.get("layout", {})))
            if key == init_key:
                base_layout = spec.get("layout", {})
        assert base_layout is not None
        init_flat = int(np.ravel_multi_index(init_key, dims))
        shown = set(combos[init_flat])
        for i, trace in enumerate(traces):
            trace["visible"] = i in shown

        def visible(k: int) -> list[bool]:
            members = set(combos[k])
            return [i in members for i in range(len(traces))]

        layout = dict(base_layout)
        sliders, menus = [], []
        single = len(varying) == 1
        for d in varying:
            name = names[d]
            steps = []
            for j, value in enumerate(self.params[name]):
                idx = list(init_key)
                idx[d] = j
                flat = int(np.ravel_multi_index(tuple(idx), dims))
                if single:
                    args = [{"visible": visible(flat)}, layouts[flat]]
                    steps.append({"label": _fmt(value), "method": "update", "args": args})
                else:
                    steps.append({"label": _fmt(value), "method": "skip", "args": []})
            if _is_numeric(self.params[name]):
                sliders.append(
                    {
                        "name": f"ql-{d}",
                        "active": init_key[d],
                        "currentvalue": {"prefix": f"{self._label(name)} = "},
                        "steps": steps,
                        "len": 1.0,
                        "x": 0.0,
                        "y": 0.0,
                        "yanchor": "top",
                        "pad": {"t": 50 + 80 * len(sliders), "b": 0},
                    }
                )
            else:
                menus.append(
                    {
                        "name": f"ql-{d}",
                        "type": "buttons",
                        "direction": "right",
                        "active": init_key[d],
                        "showactive": True,
                        "buttons": steps,
                        "x": 0.0,
                        "xanchor": "left",
                        "y": 1.0,
                        "yanchor": "bottom",
                        "pad": {"b": 28 + 36 * len(menus), "l": 0},
                    }
                )
        if menus:
            # A text label in front of each row of buttons: "<name>:"
            annotations = []
            for i, menu in enumerate(menus):
                d = int(menu["name"].split("-")[1])
                annotations.append(
                    {
                        "text": f"{self._label(names[d])}:",
                        "xref": "paper",
                        "yref": "paper",
                        "x": 0.0,
                        "y": 1.0,
                        "xanchor": "right",
                        "yanchor": "bottom",
                        "yshift": 34 + 36 * i,
                        "showarrow": False,
                    }
                )
            for upd in layouts:
                upd["annotations"] = list(upd["annotations"]) + annotations
            layout["annotations"] = list(layout.get("annotations", [])) + annotations
            # The title goes to the top of the figure, above the rows of buttons: Plotly's default
            # places it in the middle of the top margin, beside (or on) the buttons.
            title = layout.get("title") or {}
            title = {"text": title} if isinstance(title, str) else dict(title)
            layout["title"] = {**title, "y": 1.0, "yref": "container", "yanchor": "top", "pad": {"t": 14}}
        margin = dict(layout.get("margin", {}))
        margin["t"] = max(margin.get("t", 60), 70) + (36 * len(menus) + 30 if menus else 0)
        margin["b"] = max(margin.get("b", 50), 50) + 80 * len(sliders)
        margin["l"] = max(margin.get("l", 60), 90 if menus else 60)
        layout["margin"] = margin
        layout["height"] = (
            (layout.get("height") or _DEFAULT_HEIGHT)
            + (36 * len(menus) + 30 if menus else 0)
            + 80 * len(sliders)
        )
        if sliders:
            layout["sliders"] = sliders
        if menus:
            layout["updatemenus"] = menus
        script = None
        if len(varying) > 1:
            spec = {
                "dims": dims,
                "state": list(init_key),
                "n": len(traces),
                "combos": combos,
                "layouts": layouts,
                "dim_of": {f"ql-{d}": d for d in varying},
            }
            script = _COMBINE_JS.replace("__SPEC__", json.dumps(spec, separators=(",", ":")))
        return {"data": traces, "layout": layout}, script

    def static_html(self) -> str:
        """The precomputed figure as an HTML fragment (see :func:`to_static_html`)."""
        fig, script = self.static_figure()
        return to_static_html(fig, post_script=script)

    # -- live: ipywidgets --------------------------------------------------

    def _bundle(self, index: tuple[int, ...]) -> dict[str, Any]:
        if index not in self._cache:
            if len(self._cache) >= 64:  # bounded: a long session must not keep every figure
                self._cache.pop(next(iter(self._cache)))
            self._cache[index] = _live_bundle(self.figure(**self.values_at(index)))
        return self._cache[index]

    def widget(self) -> Any:
        """The live UI (built once): a slider per numeric parameter, buttons/dropdown otherwise."""
        if self._widget is not None:
            return self._widget
        import ipywidgets as widgets
        from IPython.display import display

        controls: dict[str, Any] = {}
        for name, values in self.params.items():
            if len(values) == 1:
                continue
            options = [(_fmt(v), i) for i, v in enumerate(values)]
            common = {"description": self._label(name), "style": {"description_width": "initial"}}
            if _is_numeric(values):
                control = widgets.SelectionSlider(
                    options=options, continuous_update=True, layout={"width": "460px"}, **common
                )
            elif len(values) <= 4:
                control = widgets.ToggleButtons(options=options, **common)
            else:
                control = widgets.Dropdown(options=options, **common)
            control.value = self.initial_index[name]
            controls[name] = control
        out = widgets.Output(layout={"min_height": f"{_DEFAULT_HEIGHT}px"})

        def render(_change: Any = None) -> None:
            t0 = time.perf_counter()
            index = tuple(controls[n].value if n in controls else self.initial_index[n] for n in self.params)
            bundle = self._bundle(index)
            with out:
                out.clear_output(wait=True)
                display(bundle, raw=True)
            self.timings_ms.append(1000 * (time.perf_counter() - t0))

        for control in controls.values():
            control.observe(render, names="value")
        render()
        self.controls = controls
        children = [widgets.VBox(list(controls.values())), out]
        if self.title:
            children.insert(0, widgets.HTML(f"<b>{html.escape(self.title)}</b>"))
        self._widget = widgets.VBox(children)
        return self._widget

    def set(self, **values: Any) -> None:
        """Move the live controls to ``values`` (as a student would), e.g. for a latency benchmark."""
        self.widget()
        for name, value in values.items():
            if name not in self.controls:
                raise ValueError(f"{name!r} is not a live control; controls: {list(self.controls)}")
            self.controls[name].value = self.params[name].index(value)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        if is_static():
            return {"text/html": self.static_html(), "text/plain": f"<quantlab explorer: {self.title}>"}
        return self.widget()._repr_mimebundle_(include=include, exclude=exclude)


def explorer(
    compute: Callable[..., go.Figure],
    params: Mapping[str, Sequence[Any]],
    *,
    title: str = "",
    initial: Mapping[str, Any] | None = None,
    labels: Mapping[str, str] | None = None,
    max_states: int = 256,
) -> Explorer:
    """An interactive figure: ``compute(**state)`` draws one state; ``params`` lists every state.

    Put the call last in a cell. Live, each control change calls ``compute`` and redraws (results are
    cached, so going back is free). In the static book every combination is computed once and
    Plotly's sliders (numeric parameters) and buttons (other parameters) switch between them. Give
    axes a fixed ``range`` inside ``compute`` when states should be compared on the same scale.

    Args:
        compute: ``compute(**{name: value}) -> go.Figure`` (build it with :func:`new_figure`).
        params: ``{name: [value, ...]}``; numeric lists become sliders, others buttons/dropdowns.
        title: title above the figure (used when ``compute`` sets none).
        initial: starting value per parameter (default: each list's first value).
        labels: display names for parameters, e.g. ``{"n_bits": "bits"}``.
        max_states: refuse more combinations than this (each is stored in the static page).

    Returns:
        An :class:`Explorer`, displayed by Jupyter.

    >>> ex = explorer(lambda a, b: new_figure(title=f"{a}{b}"), {"a": [1, 2], "b": ["x", "y"]})
    >>> ex.figure(a=2).layout.title.text
    '2x'
    """
    return Explorer(compute, params, title=title, initial=initial, labels=labels, max_states=max_states)


# -----------------------------------------------------------------------------
# "Predict before you run"

_CODE = re.compile(r"`([^`]+)`")
_BOLD = re.compile(r"\*\*([^*]+)\*\*")


def _inline_markdown(text: str) -> str:
    """Escape ``text`` and render `code` and **bold**."""
    return _BOLD.sub(r"<b>\1</b>", _CODE.sub(r"<code>\1</code>", html.escape(text.strip())))


def _mini_markdown(text: str) -> str:
    """Inline markdown plus blank-line paragraphs (enough for answers)."""
    return "\n".join(f"<p>{_inline_markdown(p)}</p>" for p in re.split(r"\n\s*\n", text.strip()))


_DETAILS_STYLE = (
    "border:1px solid #c9d3e0;border-left:4px solid " + COLORS["weights"] + ";border-radius:4px;"
    "padding:0.4em 0.8em;margin:0.5em 0;background:#f7f9fc"
)


class Reveal:
    """A question with a hidden answer; see :func:`reveal`."""

    def __init__(self, question: str, answer: str) -> None:
        for name, value in (("question", question), ("answer", answer)):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        self.question = question
        self.answer = answer

    def html(self) -> str:
        """The static form: a collapsed ``<details>`` element (renders in the book and in JupyterLab)."""
        return (
            f'<details class="quantlab-reveal" style="{_DETAILS_STYLE}">'
            f'<summary style="cursor:pointer"><b>Predict first:</b> {_inline_markdown(self.question)}'
            f" <i>(click to reveal the answer)</i></summary>\n"
            f'<div class="quantlab-reveal-answer">{_mini_markdown(self.answer)}</div></details>'
        )

    def widget(self) -> Any:
        """The live form: the question, a "Reveal answer" button, the answer shown on click."""
        import ipywidgets as widgets

        answer = widgets.HTML(_mini_markdown(self.answer), layout={"display": "none"})
        button = widgets.ToggleButton(value=False, description="Reveal answer", icon="eye")

        def toggle(change: Any) -> None:
            answer.layout.display = "block" if change["new"] else "none"
            button.description = "Hide answer" if change["new"] else "Reveal answer"

        button.observe(toggle, names="value")
        question = widgets.HTML(f"<b>Predict first:</b> {_inline_markdown(self.question)}")
        box = {"border": "1px solid #c9d3e0", "padding": "4px"}
        return widgets.VBox([question, button, answer], layout=box)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        if is_static():
            return {"text/html": self.html(), "text/plain": f"Predict first: {self.question}"}
        return self.widget()._repr_mimebundle_(include=include, exclude=exclude)


def reveal(question: str, answer: str) -> Reveal:
    """A "predict before you run" question; put the call last in a cell.

    Live it is a button that reveals the answer; in the book it is a collapsed HTML ``<details>``
    block (plain HTML5: it collapses in Jupyter Book 1 and in JupyterLab alike, with no extension).
    ``question`` and ``answer`` are plain text with `code`, **bold** and blank-line paragraphs.

    Args:
        question: what to predict.
        answer: the explanation shown on request.

    Returns:
        A :class:`Reveal`, displayed by Jupyter.
    """
    return Reveal(question, answer)
