"""The parts every figure of the plots shares: the result type (`PlotResult`), an Agg figure (never
pyplot, so no GUI backend or global figure state), axis labels, layer and head colours, legends
outside the axes, interval bands and their captions, and atomic writing of PNG, PDF or SVG by the
output's extension.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from warehouse.present.plot_data import PlotOptions


# colour-blind-safe (Okabe-Ito) colours of the curve shapes, in legend order
TREND_COLORS = {"rising": "#D55E00", "falling": "#0072B2", "flat": "#999999", "dip": "#CC79A7",
                "peak": "#009E73", "mixed": "#E69F00", "one bucket": "#56B4E9"}
#: Up to this many layers get one legend entry each; more get a discrete colour bar.
LAYER_LEGEND_MAX = 12
#: Opacity of the AP interval bands (per head, or of the mean).
BAND_ALPHA = 0.16
#: What the AP bands are, for captions and legends (see docs/metrics.md, "Intervals in the plots").
HEAD_BAND_TEXT = "95% interval of each head's AP (stored example-jackknife interval)"
MEAN_BAND_TEXT = ("conservative 95% interval of the mean over heads\n(mean ± t · average of the heads' "
                  "jackknife SEs: valid for any correlation between heads)")


@dataclass
class PlotResult:
    figure: Any  # matplotlib.figure.Figure
    summary: pd.DataFrame  # what the plot shows, as a table (for previews)
    n_rows: int  # input rows plotted
    n_heads: int
    extra: dict = field(default_factory=dict)
    caption: str = ""  # what the bands and bars are: drawn under the title, or written beside the figure


def title_and_caption(target, opts: PlotOptions, title: str, caption: str = "") -> str:
    """Draw the title (`opts.title`, else `title`) and the caption under it, on an axes (`set_title`) or a
    figure (`suptitle`); `opts.no_title` and `opts.no_caption` leave either out (a paper has its own
    caption: the command line then writes it beside the figure). Returns the caption."""
    shown = [None if opts.no_title else (opts.title or title), None if opts.no_caption else caption]
    text = "\n".join(t for t in shown if t)
    if text:
        setter = target.suptitle if hasattr(target, "suptitle") else target.set_title
        setter(text, fontsize="medium")
    return caption


def apply_figsize(fig, opts: PlotOptions) -> None:
    """`opts.figsize` (width, height in inches) replaces the plot's own size; the constrained layout
    fits the axes, legends and colour bars to it when the figure is written."""
    if opts.figsize:
        fig.set_size_inches(*opts.figsize)


def _figure(width: float = 8.0, height: float = 5.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _label(opts: PlotOptions) -> str:
    return opts.model_name or opts.model or ""


def _position_label(opts: PlotOptions, what: str) -> str:
    kind = "log2 buckets" if opts.bucket_type == "log" else "uniform buckets"
    return f"{what} position (bucket start, {kind} of {opts.bucket_min_size:g})"


def _fmt_pos(x: float) -> str:
    if not np.isfinite(x):
        return ""
    return f"{int(x):d}" if float(x).is_integer() else f"{x:g}"


def layer_colors(layers) -> dict[int, tuple]:
    """One viridis colour per layer, evenly spaced in layer order (the yellow end left out, for contrast)."""
    from matplotlib import colormaps

    layers = sorted(int(x) for x in layers)
    spots = np.linspace(0.0, 0.9, len(layers)) if len(layers) > 1 else np.array([0.45])
    return {layer: colormaps["viridis"](float(x)) for layer, x in zip(layers, spots)}


def _legend_outside(ax, handles=None, title: str | None = None):
    """Legend to the right of the axes, never over the data."""
    kwargs = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "fontsize": "small", "frameon": False,
              "title": title, "title_fontsize": "small"}
    return ax.legend(handles=handles, **kwargs) if handles is not None else ax.legend(**kwargs)


def _layer_key(fig, ax, colors: dict[int, tuple], heads_per_layer: dict[int, int], *extra_handles) -> None:
    """A discrete key of the layer colours: legend entries up to LAYER_LEGEND_MAX layers, else a
    colour bar with one block per layer and integer ticks; `extra_handles` (e.g. the mean) go in a legend."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    layers = sorted(colors)
    if len(layers) <= LAYER_LEGEND_MAX:
        handles = [Line2D([], [], color=colors[la], linewidth=2, label=f"layer {la} ({heads_per_layer[la]})")
                   for la in layers]
        _legend_outside(ax, handles + list(extra_handles), title="layer (heads)")
        return
    bounds = np.r_[np.asarray(layers, dtype=float) - 0.5, layers[-1] + 0.5]
    sm = ScalarMappable(norm=BoundaryNorm(bounds, len(layers)), cmap=ListedColormap([colors[la] for la in layers]))
    bar = fig.colorbar(sm, ax=ax, label="layer", spacing="proportional")
    bar.set_ticks(MaxNLocator(integer=True, nbins=12).tick_values(layers[0], layers[-1]))
    bar.ax.set_ylim(bounds[0], bounds[-1])
    fig.legend(handles=list(extra_handles), loc="outside lower right", fontsize="small", frameon=False)


def head_label(layer, q_head) -> str:
    """Legend name of a head: ``L{layer} H{q_head}``."""
    return f"L{int(layer)} H{int(q_head)}"


def categorical_colors(keys, palette: str = "colorblind") -> dict:
    """One colour per key (model or head) in the given order, from a seaborn palette (default
    "colorblind", safe for the common colour-vision deficiencies; 10 colours, then husl hues)."""
    import seaborn as sns

    keys = list(keys)
    if palette == "colorblind" and len(keys) > 10:
        palette = "husl"
    return dict(zip(keys, sns.color_palette(palette, len(keys))))


def head_colors(keys, palette: str = "colorblind") -> dict:
    """One colour per head, for plots that draw a few heads one by one (`categorical_colors`)."""
    return categorical_colors(keys, palette)


def draw_band(ax, x, low, high, color, gid: str) -> bool:
    """Shade [low, high] over x where both ends are finite (gaps elsewhere); draws nothing and returns
    False when they are nowhere finite."""
    low, high = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
    finite = np.isfinite(low) & np.isfinite(high)
    if not finite.any():
        return False
    ax.fill_between(np.asarray(x, dtype=np.float64), low, high, where=finite, color=color, alpha=BAND_ALPHA,
                    linewidth=0, gid=gid)
    return True


def band_caption(mode: str | None, n_without: int = 0, reason: str | None = None) -> str:
    """Second title line saying what the bands are: `mode` "heads" or "mean", or none drawn (`reason`);
    `n_without` heads (or points) that have no interval."""
    if mode is None:
        return f"no intervals: {reason}" if reason else ""
    text = "band: " + (HEAD_BAND_TEXT if mode == "heads" else MEAN_BAND_TEXT)
    if n_without:
        text += f"\n{n_without} {'head(s)' if mode == 'heads' else 'point(s)'} without a finite standard error: no band"
    return text


def band_handle(mode: str):
    """Legend entry of the AP band."""
    from matplotlib.patches import Patch

    return Patch(facecolor="0.5", alpha=0.35, linewidth=0,
                 label="95% interval, each head" if mode == "heads" else "95% interval of the mean\n(conservative)")


#: File formats a figure can be written in, by the output's extension (matplotlib's backends).
FIGURE_FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg"}


def figure_format(path: str | os.PathLike) -> str:
    """The format a figure is written in, from the output's extension (case-insensitive): png, pdf or svg.
    Anything else is refused, before any data is read, rather than writing PNG bytes under another name."""
    suffix = Path(path).suffix.lower()
    if suffix not in FIGURE_FORMATS:
        raise ValueError(f"output {str(path)!r}: the extension must be one of "
                         f"{', '.join(FIGURE_FORMATS)} (the figure's format follows it)")
    return FIGURE_FORMATS[suffix]


def figure_bytes(fig, fmt: str = "png", dpi: int = 110) -> bytes:
    """The figure as `fmt` (png, pdf or svg). `dpi` sets the raster resolution (PNG, and images
    embedded in a PDF or SVG); vector text and lines do not depend on it. Metadata carries no date, so the
    same figure gives the same bytes."""
    buf = io.BytesIO()
    metadata = {"png": {"Software": None}, "pdf": {"CreationDate": None, "ModDate": None},
                "svg": {"Date": None}}[fmt]
    fig.savefig(buf, format=fmt, dpi=dpi, metadata=metadata)
    return buf.getvalue()


def png_bytes(fig, dpi: int = 110) -> bytes:
    return figure_bytes(fig, "png", dpi)


def write_atomically(path: str | os.PathLike, data: bytes) -> Path:
    """Write a file through a temp file and a rename, so readers never see half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write the figure atomically (temp file + rename), so readers never see half a file, in the format
    of the path's extension (`figure_format`)."""
    return write_atomically(path, figure_bytes(fig, figure_format(path), dpi))

