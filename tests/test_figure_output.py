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
