"""`plasticity plot` output files: the format follows the extension (PNG, PDF, SVG), `--dpi` sets the
raster resolution, and the figure's title, caption, size and colours (read back from the drawn artists)."""

from __future__ import annotations

import struct
from pathlib import Path

import pandas as pd
import pytest

from cli.main import main


def bucket_csv(tmp_path: Path) -> Path:
    """Bucket cells of two heads of one layer, as `head_bucket_plasticity.csv`."""
    rows = [{"layer": 0, "q_head": h, "k_head": 0, "q_bucket": qb, "k_bucket": kb, "plasticity": 0.1 * (qb + kb + h),
             "n_pairs": 16} for h in (0, 1) for qb in range(3) for kb in range(qb + 1)]
    path = tmp_path / "head_bucket_plasticity.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])  # IHDR width, height


def test_format_follows_the_extension_and_dpi_sets_the_raster_size(tmp_path, capsys):
    csv = bucket_csv(tmp_path)
    outputs = {}
    for name in ("fig.pdf", "fig.svg", "fig.png", "FIG.PDF"):
        out = tmp_path / name
        assert main(["plot", "heatmap", "--bucket_csv", str(csv), "--output", str(out)]) == 0
        outputs[name] = out.read_bytes()
    assert outputs["fig.pdf"][:5] == b"%PDF-" and outputs["FIG.PDF"][:5] == b"%PDF-"
    assert outputs["fig.pdf"] == outputs["FIG.PDF"]  # no creation date: the same figure, the same bytes
    svg = outputs["fig.svg"].decode()
    assert svg.startswith("<?xml") and "<svg" in svg[:600]
    # default dpi 110; --dpi 220 (and the dashed spelling) doubles every side of the raster
    width, height = png_size(outputs["fig.png"])
    assert main(["plot", "heatmap", "--bucket_csv", str(csv), "--dpi", "220", "--output", str(tmp_path / "hi.png")]) == 0
    assert png_size((tmp_path / "hi.png").read_bytes()) == pytest.approx((2 * width, 2 * height), abs=2)
    assert width == pytest.approx(110 * 6.2, abs=2)  # the heatmap of 3 buckets is 6.2 x 5 inches
    capsys.readouterr()
    # an extension that is no figure format stops before anything is read or written
    assert main(["plot", "heatmap", "--bucket_csv", str(tmp_path / "absent.csv"),
                 "--output", str(tmp_path / "fig.jpg")]) == 2
    err = capsys.readouterr().err
    assert "extension must be one of .png, .pdf, .svg" in err and "absent" not in err
    assert not (tmp_path / "fig.jpg").exists()


def drawn_figures(monkeypatch) -> list:
    from warehouse.present import figure_parts

    figures, real = [], figure_parts.save_figure
    monkeypatch.setattr(figure_parts, "save_figure",
                        lambda fig, path, dpi=110: figures.append(fig) or real(fig, path, dpi))
    return figures


def test_title_caption_size_and_palette_defaults_and_options(tmp_path, monkeypatch, capsys):
    import seaborn as sns
    from matplotlib.colors import to_rgb

    csv = bucket_csv(tmp_path)
    figures = drawn_figures(monkeypatch)
    caption = "no intervals: a CSV export holds no stored intervals"
    # defaults: the title and the caption under it, the plot's own size, colour-blind-safe head colours
    assert main(["plot", "curves", "--bucket_csv", str(csv), "--output", str(tmp_path / "a.pdf")]) == 0
    ax = figures[-1].axes[0]
    assert ax.get_title() == f"per-bucket attention plasticity (2 heads)\n{caption}"
    assert tuple(figures[-1].get_size_inches()) == (9.0, 5.0)
    heads = [ln for ln in ax.get_lines() if ln.get_label() in ("L0 H0", "L0 H1")]
    assert [to_rgb(ln.get_color()) for ln in heads] == [tuple(c) for c in sns.color_palette("colorblind", 2)]
    assert not (tmp_path / "a.caption.txt").exists()
    assert "caption:" not in capsys.readouterr().out
    # no title, no caption (written beside the figure), 4 x 3 inches, another palette; dashed spellings
    out = tmp_path / "b.png"
    assert main(["plot", "curves", "--bucket_csv", str(csv), "--no-title", "--no_caption", "--figsize", "4", "3",
                 "--palette", "deep", "--output", str(out)]) == 0
    ax = figures[-1].axes[0]
    assert ax.get_title() == "" and not figures[-1].texts
    assert (tmp_path / "b.caption.txt").read_text() == caption + "\n"
    assert f"caption: {tmp_path / 'b.caption.txt'}" in capsys.readouterr().out
    assert png_size(out.read_bytes()) == (440, 330)  # 4 x 3 inches at 110 dpi
    heads = [ln for ln in ax.get_lines() if ln.get_label() in ("L0 H0", "L0 H1")]
    assert [to_rgb(ln.get_color()) for ln in heads] == [tuple(c) for c in sns.color_palette("deep", 2)]
    # the title alone can go, the caption stays; a given title replaces the default one
    assert main(["plot", "curves", "--bucket_csv", str(csv), "--title", "Figure 2", "--output",
                 str(tmp_path / "c.svg")]) == 0
    assert figures[-1].axes[0].get_title() == f"Figure 2\n{caption}"
    assert main(["plot", "curves", "--bucket_csv", str(csv), "--no-title", "--output", str(tmp_path / "d.svg")]) == 0
    assert figures[-1].axes[0].get_title() == caption
    assert main(["plot", "curves", "--bucket_csv", str(csv), "--figsize", "4", "--output", str(tmp_path / "e.svg")]) == 2
    assert "figsize" in capsys.readouterr().err
