"""The paper's look inside a trained ViT (arXiv:2010.11929, Section 4.5, Figures 6 and 7), in one call.

:func:`analyze` runs a model over uint8 images and writes, into one folder:

* ``rollout.png``: attention rollout (Abnar & Zuidema 2020) over sample images (Figure 6);
* ``filters.png``: principal components of the patch-embedding filters (Figure 7 left);
* ``position_similarity.png``: cosine similarity of each position embedding with all others, one map per
  patch position on the patch grid (Figure 7 centre), for absolute embeddings only;
* ``attention_distance.png``: mean attention distance per head against depth, in pixels (Figure 7 right);
* ``report.md`` linking them, and ``analysis.json`` with the numbers, written last.

The math lives in :mod:`vitlab.analysis` and the drawing in :mod:`vitlab.report`; this module runs the model
in batches (the attention maps of a batch cost layers x heads x T^2 floats per image) and puts it together.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vitlab import analysis
from vitlab import report as rp
from vitlab.evaluate import normalize
from vitlab.io import atomic_write_text
from vitlab.model import ViT, count_parameters

ROLLOUT_RESIDUAL = 0.5  # weight of the identity for the residual connection, as in Abnar & Zuidema
MAPS_BUDGET = 256 * 2**20  # bytes of attention maps held at once when the batch size is chosen automatically
FIGURES = {
    "rollout": "rollout.png",
    "filters": "filters.png",
    "position_similarity": "position_similarity.png",
    "attention_distance": "attention_distance.png",
}
_NO_POSITION_FIGURE = {
    "none": "the model has no position embeddings (pos_embed='none'): there is nothing to compare",
    "relative": (
        "the model encodes positions as a learned relative bias on the attention logits (pos_embed='relative'), "
        "not as one embedding per position: there is no per-position vector to compare"
    ),
}


def check_images(model: ViT, images: Tensor) -> None:
    """Raise ValueError unless ``images`` is a non-empty uint8 (B, C, H, W) batch the model can take."""
    c = model.config
    if not isinstance(images, Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"expected uint8 images of shape (batch, {c.in_channels}, H, W), got {shape}")
    if images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images (0-255, before normalisation), got dtype {images.dtype}")
    if len(images) == 0:
        raise ValueError("no images to analyse")
    _, ch, h, w = images.shape
    if ch != c.in_channels:
        raise ValueError(f"the model takes {c.in_channels} channel(s), got images with {ch}")
    p = c.patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")


def auto_batch_size(model: ViT, grid: tuple[int, int], budget: int = MAPS_BUDGET) -> int:
    """The largest batch whose fp32 attention maps (layers x heads x T^2 per image) fit in ``budget`` bytes.

    Small models then run in one or two large batches (per-call overhead dominates them on a CPU), and
    ViT-B/16 at 224 (21.3 MiB of maps per image) in batches of 12."""
    c = model.config
    t = grid[0] * grid[1] + c.num_prefix_tokens
    per_image = 4 * c.num_layers * c.num_heads * t * t
    return max(1, budget // per_image)


@torch.no_grad()
def attention_statistics(
    model: ViT,
    images: Tensor,
    *,
    batch_size: int | None = None,
    residual: float = ROLLOUT_RESIDUAL,
) -> dict[str, Tensor]:
    """Run ``model`` over uint8 ``images`` in batches and reduce the attention maps as they come.

    Returns ``distance`` (layers, heads): mean attention distance in pixels averaged over all images;
    ``relevance`` (B, N): the rollout's distribution of the image representation over patches, per image
    (:func:`vitlab.analysis.rollout_relevance`).
    ``batch_size`` None: :func:`auto_batch_size`."""
    check_images(model, images)
    pre = model.preprocessing
    p = model.config.patch_size
    grid = (images.shape[-2] // p, images.shape[-1] // p)
    if batch_size is None:
        batch_size = auto_batch_size(model, grid)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prefix = model.config.num_prefix_tokens
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    distance_sum: Tensor | None = None
    relevance = []
    try:
        for i in range(0, len(images), batch_size):
            x = normalize(images[i : i + batch_size].to(device), pre.mean, pre.std)
            maps = model.attention_maps(x)  # per layer (b, heads, T, T)
            d = analysis.mean_attention_distance(maps, grid, p).cpu() * len(x)  # (layers, heads)
            distance_sum = d if distance_sum is None else distance_sum + d
            rollout = analysis.attention_rollout(maps, residual).cpu()  # (b, T, T)
            relevance.append(analysis.rollout_relevance(rollout, prefix))
            del maps
    finally:
        model.train(was_training)
    assert distance_sum is not None
    return {
        "distance": distance_sum / len(images),
        "relevance": torch.cat(relevance),
    }


def patch_position_embeddings(model: ViT, grid: tuple[int, int]) -> Tensor | None:
    """(N, D): the absolute position embedding of each patch (class slot left out), or None when the model
    has none (``relative`` and ``none``)."""
    pos = model.position_embeddings(grid)
    if pos is None:
        return None
    n = grid[0] * grid[1]
    return pos[0, -n:].detach()


def analyze(
    model: ViT,
    images: Tensor,
    out_dir: str | Path,
    *,
    batch_size: int | None = None,
    num_samples: int = 16,
    num_components: int = 28,
    source: str | None = None,
) -> dict[str, Any]:
    """Figures 6 and 7 of the paper for ``model`` over uint8 ``images`` (B, C, H, W), written to ``out_dir``.

    Statistics use every image; the rollout figure shows the first ``num_samples``. Returns what is written to
    ``analysis.json``: ``mean_attention_distance`` [layers][heads] in pixels, the position similarity matrix
    [N][N] (or a note saying why there is none), rollout statistics, filter-component explained variance, the
    model config and timings. Raises ValueError on bad input before anything is written."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a folder")
    check_images(model, images)
    if num_samples < 1 or num_components < 1:
        raise ValueError(f"num_samples and num_components must be >= 1, got {num_samples} and {num_components}")
    c = model.config
    p = c.patch_size
    h, w = images.shape[-2:]
    grid = (h // p, w // p)
    n = grid[0] * grid[1]
    timings: dict[str, float] = {}

    started = time.perf_counter()
    stats = attention_statistics(model, images, batch_size=batch_size)
    timings["attention"] = time.perf_counter() - started
    distance = stats["distance"]
    entropy, centre = analysis.rollout_statistics(stats["relevance"], grid)
    centre_count = int(analysis.centre_patches(grid).sum())

    started = time.perf_counter()
    components, explained = analysis.filter_components(model.patch_embed.proj.weight.detach().cpu(), num_components)
    pos = patch_position_embeddings(model, grid)
    similarity = analysis.position_similarity(pos.cpu()) if pos is not None else None
    timings["weights"] = time.perf_counter() - started

    # Everything is computed: only now touch the output folder.
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    (out / "analysis.json").unlink(missing_ok=True)  # a stale one would vouch for figures not yet rewritten
    samples = images[:num_samples]
    rp.plot_relevance(samples.cpu(), stats["relevance"][: len(samples)], grid, out / FIGURES["rollout"])
    kind = "RGB " if c.in_channels == 3 else ""
    rp.plot_filter_components(
        components,
        explained,
        out / FIGURES["filters"],
        title=f"{kind}embedding filters: top {len(components)} principal components "
        f"({100 * float(explained.sum()):.0f}% of the variance)",
    )
    figures = {k: v for k, v in FIGURES.items() if k != "position_similarity"}
    if similarity is not None:
        rp.plot_position_similarity(
            similarity,
            grid,
            out / FIGURES["position_similarity"],
            title=f"position embedding similarity ({c.pos_embed})",
        )
        figures["position_similarity"] = FIGURES["position_similarity"]
    else:
        (out / FIGURES["position_similarity"]).unlink(missing_ok=True)  # from an earlier model, if any
    rp.plot_attention_distance(
        distance, out / FIGURES["attention_distance"], image_size=max(h, w),
        title=f"mean attention distance ({len(images)} images)",
    )  # fmt: skip
    timings["figures"] = time.perf_counter() - started

    position: dict[str, Any] = {"kind": c.pos_embed, "grid": list(grid)}
    if similarity is None:
        position["note"] = _NO_POSITION_FIGURE.get(c.pos_embed, f"no absolute position embeddings ({c.pos_embed})")
    else:
        position["matrix"] = [[round(v, 5) for v in row] for row in similarity.tolist()]
        off = similarity[~torch.eye(n, dtype=torch.bool)]
        position["mean_off_diagonal"] = float(off.mean()) if off.numel() else None
    result: dict[str, Any] = {
        "source": source,
        "model": {
            "config": c.to_dict(),
            "preprocessing": model.preprocessing.to_dict(),
            "parameters": count_parameters(model),
        },
        "num_images": len(images),
        "image_size": [h, w],
        "grid": list(grid),
        "mean_attention_distance": [[round(v, 4) for v in row] for row in distance.tolist()],
        "mean_attention_distance_by_layer": [round(v, 4) for v in distance.mean(dim=1).tolist()],
        "rollout": {
            "residual": ROLLOUT_RESIDUAL,
            "query": "class token" if c.num_prefix_tokens else "mean of the patch tokens (global average pooling)",
            "mean_entropy": float(entropy.mean()),
            "uniform_entropy": float(torch.log(torch.tensor(float(n)))),
            "mean_normalised_entropy": float(entropy.mean()) / max(float(torch.log(torch.tensor(float(n)))), 1e-12),
            "centre_share": float(centre.mean()),
            "centre_share_uniform": centre_count / n,
            "centre_patches": centre_count,
            "max_patch_share": float(stats["relevance"].max(dim=-1).values.mean()),
        },
        "position_similarity": position,
        "filter_components": {
            "count": len(components),
            "shape": list(components.shape[1:]),
            "explained_variance": [round(v, 6) for v in explained.tolist()],
            "explained_variance_total": float(explained.sum()),
        },
        "figures": figures,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    rp.write_report(out / "report.md", "What the ViT learned (paper Figures 6 and 7)", _report_sections(result))
    atomic_write_text(out / "analysis.json", to_json(result))  # last: its presence means the run finished
    return result


def to_json(obj: Any) -> str:
    """Indented JSON with each list of numbers kept on one line (a [N][N] matrix is N lines, not N^2)."""
    rows: list[str] = []
    tag = uuid.uuid4().hex  # a placeholder no real string can be

    def pack(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: pack(v) for k, v in x.items()}
        if isinstance(x, list):
            if x and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in x):
                rows.append(json.dumps(x, allow_nan=False))
                return f"{tag}:{len(rows) - 1}"
            return [pack(v) for v in x]
        return x

    text = json.dumps(pack(obj), indent=2, allow_nan=False)
    return re.sub(f'"{tag}:(\\d+)"', lambda m: rows[int(m.group(1))], text) + "\n"


def _report_sections(r: dict[str, Any]) -> list[tuple[str, str]]:
    c = r["model"]["config"]
    ro = r["rollout"]
    dist = r["mean_attention_distance_by_layer"]
    fc = r["filter_components"]
    (h, w), (gh, gw) = r["image_size"], r["grid"]
    table = rp.markdown_table(
        [
            ("source", str(r["source"])),
            ("model", f"patch {c['patch_size']}, width {c['hidden_dim']}, depth {c['num_layers']}, "
                      f"{c['num_heads']} heads, pos_embed {c['pos_embed']}, pool {c['pool']}, "
                      f"{r['model']['parameters']:,} parameters"),
            ("images", f"{r['num_images']} at {h}x{w} (grid {gh}x{gw})"),
            ("mean attention distance, first / last layer", f"{dist[0]:.1f} / {dist[-1]:.1f} px"),
            ("rollout entropy", f"{ro['mean_entropy']:.3f} nats (uniform: {ro['uniform_entropy']:.3f})"),
            ("rollout share on the centre patches", f"{100 * ro['centre_share']:.1f}% "
                                                    f"(uniform: {100 * ro['centre_share_uniform']:.1f}%)"),
            ("filter PCA, variance in the top components",
             f"{100 * fc['explained_variance_total']:.1f}% in {fc['count']}"),
        ]
    )  # fmt: skip
    pos = r["position_similarity"]
    if "note" in pos:
        centre = f"No figure: {pos['note']}."
    else:
        centre = (
            f"Cosine similarity of each patch's {pos['kind']} position embedding with all others; the tile at row i, "
            f"column j is the map for the patch there. Mean off-diagonal similarity "
            f"{pos['mean_off_diagonal'] or 0:.3f}.\n\n![position similarity]({FIGURES['position_similarity']})"
        )
    return [
        ("Summary", table),
        (
            "Attention rollout (Figure 6)",
            f"How much the image representation ({ro['query']}) draws on each patch, rolled out through all layers "
            f"(heads averaged, identity mixed in with weight {ro['residual']} for the residual).\n\n"
            f"![rollout]({FIGURES['rollout']})",
        ),
        ("Patch-embedding filters (Figure 7, left)", f"![filters]({FIGURES['filters']})"),
        ("Position embedding similarity (Figure 7, centre)", centre),
        (
            "Mean attention distance (Figure 7, right)",
            "Pixel distance between query and key patches weighted by the attention, averaged over queries and "
            f"{r['num_images']} images; one dot per head.\n\n![attention distance]({FIGURES['attention_distance']})",
        ),
        ("Numbers", "All numbers are in `analysis.json`."),
    ]
