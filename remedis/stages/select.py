"""The selection stage: which of a site's unlabeled images to label next.

The site's images are embedded with the backbone it will adapt (its own preprocessing, the same pixels
adaptation sees), and a registered strategy (`remedis.adapt.selection`) chooses, patient-aware and
deterministic by seed. The result is a worklist for the site's annotators; once labeled, those rows are
the labels `remedis adapt` trains on.

Pool: the site's rows without a label outside the val and test splits. Labeled: the site's rows with a
label outside val and test, and the rows of `labeled` (a manifest of images labeled already).

Example:
    >>> work = select_images(Path("backbones/remedis"), read_manifest("site.csv"), "HOSP-2", "50", "typiclust", seed=0)
    >>> work.write(Path("worklist.csv"))
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from remedis import resume
from remedis.config import ConfigError
from remedis.data.dataset import ImageCache, load_images
from remedis.data.manifest import Manifest, Record
from remedis.data.preprocess import Preprocessing
from remedis.files import atomic_write, atomic_write_text
from remedis.stages.data import budget_images

log = logging.getLogger("remedis")

WORKLIST_COLUMNS = ("image", "patient_id", "rank", "strategy", "cluster")


@dataclass
class Worklist:
    """The images to label next, in order, and what the choice was made from.

    Args:
        chosen: the chosen records, in the order to label them.
        clusters: each one's cluster (-1: the strategy does not cluster).
        strategy: the strategy's name.
        pool: unlabeled images that could be chosen (readable ones).
        labeled: labeled images the choice took into account.
        skipped: unreadable images, with the reason (not chosen, not counted in the pool).
        embeddings: (pool + labeled, D) embeddings, for the picture.
        roles: per embedding row, 0 pool, 1 labeled, 2 chosen.
        seconds: {"embed": ..., "select": ...}.
    """

    chosen: list[Record]
    clusters: list[int]
    strategy: str
    pool: int
    labeled: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    embeddings: np.ndarray | None = None
    roles: np.ndarray | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def write(self, path: Path) -> Path:
        """The worklist CSV (image paths relative to its folder, like a manifest) and a picture of the embedding
        beside it (`<name>.png`); returns the CSV's path."""
        path = Path(path)
        base = path.parent.resolve()
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(WORKLIST_COLUMNS)
        for rank, (r, c) in enumerate(zip(self.chosen, self.clusters), start=1):
            w.writerow([os.path.relpath(Path(r.image).resolve(), base), r.patient_id, rank, self.strategy,
                        "" if c < 0 else c])
        atomic_write_text(path, buf.getvalue())
        if self.embeddings is not None and len(self.embeddings) >= 2:
            atomic_write(path.with_suffix(".png"), self.picture())
        return path

    def picture(self) -> bytes:
        """PNG: the embeddings' first two principal components, the pool grey, labeled images blue, the
        chosen ones red with their rank."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        x = self.embeddings - self.embeddings.mean(0)
        _, _, vt = np.linalg.svd(x, full_matrices=False)
        xy = x @ vt[:2].T
        fig, ax = plt.subplots(figsize=(6, 5), dpi=100)
        for role, colour, label, size in ((0, "0.75", "pool", 6), (1, "tab:blue", "labeled", 14), (2, "tab:red", "chosen", 22)):
            m = self.roles == role
            if m.any():
                ax.scatter(xy[m, 0], xy[m, 1], s=size, c=colour, label=f"{label} ({int(m.sum())})", linewidths=0)
        chosen_rows = np.flatnonzero(self.roles == 2)
        for rank, i in enumerate(chosen_rows[:30], start=1):
            ax.annotate(str(rank), xy[i], fontsize=6, color="tab:red", xytext=(2, 2), textcoords="offset points")
        ax.set_title(f"remedis select: {self.strategy}, {len(self.chosen)} of {self.pool} images")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(loc="best", fontsize=7)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
        plt.close(fig)
        return buf.getvalue()


def selection_budget(budget: float | int, pool: int) -> int:
    """A budget as an image count: a fraction of the pool (at least one image), or a count as given."""
    return max(1, round(budget * pool)) if isinstance(budget, float) else int(budget)


def site_pool(manifest: Manifest, site: str, labeled: Manifest | None = None) -> tuple[list[Record], list[Record]]:
    """(pool, labeled) records of `site`: unlabeled rows outside val/test, and labeled rows outside val/test
    plus every row of `labeled` (matched by image path; they leave the pool).

    Raises:
        ConfigError: the site is not in the manifest.
    """
    if site not in manifest.sites():
        raise ConfigError(f"--site {site!r} is not in {manifest.path or 'the manifest'} (sites: {', '.join(manifest.sites())})")
    rows = [r for r in manifest.records if r.site == site and r.split not in ("val", "test")]
    done = {Path(r.image).resolve(): r for r in (labeled.records if labeled is not None else [])}
    pool = [r for r in rows if not r.label and Path(r.image).resolve() not in done]
    have = [r for r in rows if r.label or Path(r.image).resolve() in done]
    known = {Path(r.image).resolve() for r in have}
    have += [r for p, r in done.items() if p not in known]
    return pool, have


def embed_records(backbone: Path, records: list[Record]):
    """L2-normalised embeddings of the readable `records` by the backbone, decoded with its preprocessing.

    Returns:
        (the `ImageCache` of the readable records, (N, D) float32 embeddings).
    """
    from remedis.models.checkpoint import read_meta

    meta = read_meta(backbone)
    if meta.get("kind") != "backbone":
        raise ConfigError(f"{backbone}: is a {meta.get('kind')!r} checkpoint, not a backbone")
    cache = load_images(records, Preprocessing.from_dict(meta["preprocessing"]))
    return cache, embed_cache_with(backbone, cache)


def select_images(backbone: Path, manifest: Manifest, site: str, budget: float | int, strategy: str, seed: int = 0,
                  labeled: Manifest | None = None) -> Worklist:
    """Choose `budget` of the site's unlabeled images to label next.

    Args:
        backbone: the backbone folder the site will adapt (embeddings and preprocessing).
        manifest: the site's manifest (rows without a label are the pool).
        site: the site.
        budget: an image count, or a fraction of the pool.
        strategy: a registered strategy (`remedis.adapt.selection.strategy_names()`).
        seed: fixes every random choice (clustering, order).
        labeled: a manifest of images labeled already, beyond the manifest's own labeled rows.

    Raises:
        ConfigError / ValueError: an unknown site or strategy, an empty pool, a budget larger than the pool.
    """
    from remedis.adapt.selection import SelectionPool, get_strategy

    chooser = get_strategy(strategy)  # fails before any decoding
    pool, have = site_pool(manifest, site, labeled)
    if not pool:
        raise ValueError(f"site {site!r}: no unlabeled image outside the val and test splits to choose from "
                         f"({len(have)} labeled)")
    t0 = time.perf_counter()
    cache, emb = embed_records(backbone, pool + have)
    readable = {r.image for r in cache.records}
    n_pool = sum(r.image in readable for r in pool)
    skipped = [(Path(p).name, reason) for p, reason in cache.failures]
    if skipped:
        log.warning("select: %d unreadable image(s) skipped (first: %s: %s)", len(skipped), *skipped[0])
    count = selection_budget(budget, n_pool)
    if n_pool == 0:
        raise ValueError(f"site {site!r}: none of the {len(pool)} unlabeled images could be read")
    if count > n_pool:
        raise ValueError(f"--budget {count} is larger than the pool ({n_pool} unlabeled images of site {site!r})")
    pool_images = {r.image for r in pool}
    is_labeled = np.array([r.image not in pool_images for r in cache.records])
    t1 = time.perf_counter()
    chosen = chooser.select(SelectionPool(emb, [r.patient_id for r in cache.records], is_labeled), count, seed)
    t2 = time.perf_counter()
    roles = is_labeled.astype(np.int64)
    roles[chosen.indices] = 2
    log.info("select: %d of %d images by %s (%d labeled already; embed %.1f s, select %.1f s)", len(chosen.indices),
             n_pool, strategy, int(is_labeled.sum()), t1 - t0, t2 - t1)
    return Worklist([cache.records[i] for i in chosen.indices], chosen.clusters, strategy, n_pool, int(is_labeled.sum()),
                    skipped, emb, roles, {"embed": t1 - t0, "select": t2 - t1})


STRATIFIED = "stratified"  # adapt.selection's default: `budget_images`' label-stratified random draw


class BudgetChooser:
    """The train images of each label budget, as `adapt.selection` chooses them.

    `stratified` draws a nested, label-stratified random subset (`budget_images`); a registered strategy
    (`remedis select --strategy`) chooses ceil(fraction x train images) of them on the embeddings of
    `backbone`, without their labels, as a site labeling its images would. The embedding pass runs once.

    Args:
        selection: "stratified" or a registered strategy name.
        backbone: the backbone folder whose embeddings a strategy reads (None: stratified only).
        train: the site's train images.
        seed: the seed of the draw or the strategy.

    Example:
        >>> chooser = BudgetChooser("typiclust", Path("runs/x/backbones/remedis"), site.train, seed=0)
        >>> chooser.images(0.1)
    """

    def __init__(self, selection: str, backbone: Path | None, train: ImageCache, seed: int):
        from remedis.adapt.selection import get_strategy

        self.selection, self.backbone, self.train, self.seed = selection, backbone, train, seed
        self._embeddings: np.ndarray | None = None
        if selection != STRATIFIED:
            try:
                self.strategy = get_strategy(selection)
            except (KeyError, ValueError) as exc:
                raise ConfigError(f"adapt.selection: {exc}; or {STRATIFIED!r}") from None
            if backbone is None:
                raise ConfigError(f"adapt.selection: {selection!r} chooses on a pretrained backbone's embeddings; "
                                  f"random initialisation has none (use {STRATIFIED!r} or adapt a pretrained backbone)")

    def key(self) -> Any:
        """What the choice depends on beyond the budget and seed (for resume keys)."""
        return None if self.selection == STRATIFIED else (self.selection, resume.weights_of(self.backbone))

    def images(self, budget: float | int) -> ImageCache:
        """The budget's labeled train images."""
        if self.selection == STRATIFIED:
            return budget_images(self.train, budget, self.seed)
        from remedis.adapt.selection import SelectionPool

        n = len(self.train)
        count = min(n, math.ceil(budget * n - 1e-9) if isinstance(budget, float) else int(budget))
        if self._embeddings is None:
            self._embeddings = embed_cache_with(self.backbone, self.train)
        picked = self.strategy.select(SelectionPool(self._embeddings, [r.patient_id for r in self.train.records]),
                                      count, self.seed)
        chosen = {self.train.records[i].image for i in picked.indices}
        return self.train.subset(lambda r: r.image in chosen)


def embed_cache_with(backbone: Path, cache: ImageCache) -> np.ndarray:
    """L2-normalised embeddings of decoded images by a backbone folder (they must be decoded with its preprocessing)."""
    from remedis.models.backbones import create_backbone
    from remedis.models.checkpoint import load_checkpoint, load_matching
    from remedis.models.inference import embed_cache

    state, meta = load_checkpoint(backbone)
    net = create_backbone(meta["architecture"], int(meta["in_chans"]))
    load_matching(net, state, str(backbone))
    emb = embed_cache(net.eval(), cache).float().numpy() if len(cache) else np.zeros((0, 1), np.float32)
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
