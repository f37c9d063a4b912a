"""Regions Z_1..Z_K: static k-means (FAISS or torch), feature extraction, a content-addressed cache, online MacQueen."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fsynth.cache import content_key, ensure_built, publish_dir
from fsynth.errors import FsynthError

MODES = ("static", "online", "single")
_BACKENDS = ("auto", "faiss", "torch")


def num_regions(mode: str, cluster_multiple: float, num_classes: int) -> int:
    """K: 1 for the `single` mode, else max(1, round(cluster_multiple * num_classes))."""
    if mode not in MODES:
        raise FsynthError(f"unknown partition.mode {mode!r}; valid modes: {', '.join(MODES)}")
    if mode == "single":
        return 1
    if num_classes < 1:
        raise FsynthError(f"cannot partition a dataset with {num_classes} classes; check the dataset's class list")
    if cluster_multiple <= 0:
        raise FsynthError(f"partition.cluster_multiple must be positive, got {cluster_multiple}; e.g. 1, 2 or 4")
    return max(1, int(round(cluster_multiple * num_classes)))


# ----------------------------------------------------------------------------------------------------------- k-means


@dataclass(frozen=True)
class KMeansResult:
    """centroids float32 [K, D], assignments int64 [N] (nearest final centroid), iterations actually run."""

    centroids: np.ndarray
    assignments: np.ndarray
    iterations_run: int
    backend: str
    inertia: float  # sum over points of the squared L2 distance to the assigned final centroid


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _sq_dists(x: torch.Tensor, c: torch.Tensor, x_sq: torch.Tensor) -> torch.Tensor:
    """Squared L2 distances [N, K] between rows of x [N, D] and c [K, D]; x_sq [N] = |x|^2 precomputed."""
    # The expansion needs no [N, K, D] temporary, which pixel features (D = 12,288) could not afford.
    return (x_sq[:, None] - 2.0 * (x @ c.T) + (c * c).sum(1)[None, :]).clamp_min_(0.0)


def _kmeanspp_indices(x: torch.Tensor, k: int, generator: torch.Generator) -> list[int]:
    """Seeded greedy k-means++: indices of k distinct rows of x [N, D] to start from.

    Each step draws 2 + log(k) candidates by D^2 sampling and keeps the one that lowers the potential most (as
    scikit-learn does); plain k-means++ too often puts two seeds in one blob, which Lloyd's steps cannot undo.
    """
    n = x.shape[0]
    trials = 2 + int(np.log(k))
    x_sq = (x * x).sum(1)
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    d2 = _sq_dists(x, x[chosen], x_sq)[:, 0].double()
    for _ in range(1, k):
        d2[chosen] = 0.0  # rounding in the expansion must not let a chosen point be drawn again
        if float(d2.sum()) <= 0.0:  # fewer distinct points than k: any unchosen row will do
            free = torch.ones(n, dtype=torch.bool)
            free[chosen] = False
            candidates = free.nonzero()[:, 0]
            chosen.append(int(candidates[torch.randint(len(candidates), (1,), generator=generator)]))
            continue
        cands = torch.multinomial(d2 / d2.sum(), trials, replacement=True, generator=generator)
        # One matmul scores every candidate; for pixel features (D = 12,288) these matmuls are the start's cost.
        new_d2 = torch.minimum(d2[:, None], _sq_dists(x, x[cands], x_sq).double())
        best = int(new_d2.sum(0).argmin())
        chosen.append(int(cands[best]))
        d2 = new_d2[:, best].contiguous()
    return chosen


def _lloyd_step(x: torch.Tensor, x_sq: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """One Lloyd iteration: assign to the nearest centroid, then move each centroid to its points' mean."""
    d2, assign = _sq_dists(x, c, x_sq).min(1)
    k = c.shape[0]
    counts = torch.bincount(assign, minlength=k)
    new = torch.zeros_like(c).index_add_(0, assign, x) / counts.clamp_min(1)[:, None].to(c.dtype)
    empty = (counts == 0).nonzero()[:, 0]
    if len(empty):
        # Re-seed each empty cluster with one of the points farthest from their centroid; a stable sort keeps the
        # choice deterministic under ties.
        far = torch.sort(d2, descending=True, stable=True).indices[: len(empty)]
        new[empty] = x[far]
    return new


def _kmeans_torch(x_np: np.ndarray, init: np.ndarray, iterations: int) -> tuple[np.ndarray, int]:
    """Lloyd's algorithm for exactly `iterations` iterations from centroids init [K, D]."""
    x = torch.from_numpy(x_np)
    x_sq = (x * x).sum(1)
    c = torch.from_numpy(init.copy())
    for _ in range(iterations):
        c = _lloyd_step(x, x_sq, c)
    return c.numpy(), iterations


def _kmeans_faiss(x: np.ndarray, init: np.ndarray, iterations: int, seed: int) -> tuple[np.ndarray, int]:
    """faiss.Kmeans from centroids init [K, D], made to use every point and to run every iteration."""
    import faiss

    n, d = x.shape
    k = init.shape[0]
    params: dict[str, Any] = {
        "niter": iterations,
        "seed": seed,
        "max_points_per_centroid": -(-n // k),  # the default (256) silently subsamples above 256 * K points
        "min_points_per_centroid": 1,  # only silences FAISS's "please provide more points" warning
        "verbose": False,
    }
    if hasattr(faiss.ClusteringParameters(), "early_stop_threshold"):
        params["early_stop_threshold"] = -1.0  # FAISS >= 1.15 stops once the objective stalls (threshold 0.0)
    km = faiss.Kmeans(d, k, **params)
    km.train(x, init_centroids=init)
    return np.ascontiguousarray(km.centroids, dtype=np.float32), len(km.iteration_stats)


def _assign_all(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, float]:
    """Nearest-centroid assignments int64 [N] of x [N, D] and the inertia, computed the same way for every backend."""
    xt, ct = torch.from_numpy(x), torch.from_numpy(centroids)
    d2, assign = _sq_dists(xt, ct, (xt * xt).sum(1)).min(1)
    return assign.numpy().astype(np.int64), float(d2.double().sum())


def kmeans(x: np.ndarray, k: int, *, iterations: int = 300, seed: int = 0, backend: str = "auto") -> KMeansResult:
    """K-means of x [N, D] float32 into k clusters from seeded k-means++ centroids; deterministic for a seed.

    backend: "faiss", "torch" (Lloyd's algorithm, exactly `iterations` iterations) or "auto" (FAISS if importable).
    Both backends start from the same k-means++ centroids, so they differ only in how Lloyd's steps are computed.
    """
    if backend not in _BACKENDS:
        raise FsynthError(f"unknown k-means backend {backend!r}; valid backends: {', '.join(_BACKENDS)}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise FsynthError(f"k-means needs a 2-D [N, D] feature array, got shape {x.shape}")
    n = x.shape[0]
    if k > n:
        raise FsynthError(f"K = {k} regions but only {n} points; lower partition.cluster_multiple or add images")
    if k < 1 or iterations < 1:
        raise FsynthError(f"k-means needs K >= 1 and iterations >= 1, got K = {k}, iterations = {iterations}")
    if not np.isfinite(x).all():
        raise FsynthError("k-means features contain NaN or infinite values; check the encoder or the images")
    if not x.flags.writeable:
        x = x.copy()  # torch.from_numpy warns on read-only arrays
    if backend == "auto":
        backend = "faiss" if _faiss_available() else "torch"
    init_idx = _kmeanspp_indices(torch.from_numpy(x), k, torch.Generator().manual_seed(seed))
    init = x[init_idx].copy()
    if backend == "faiss":
        centroids, run = _kmeans_faiss(x, init, iterations, seed)
    else:
        centroids, run = _kmeans_torch(x, init, iterations)
    assignments, inertia = _assign_all(x, centroids)
    return KMeansResult(centroids, assignments, run, backend, inertia)


# ---------------------------------------------------------------------------------------------------------- features


def pixel_features(images: Sequence[Image.Image], side: int) -> np.ndarray:
    """Flattened RGB pixels [N, side * side * 3] float32 in [0, 1], (row, column, channel) order, after a resize."""
    if side < 1:
        raise FsynthError(f"partition.pixel_side must be at least 1, got {side}")
    out = np.empty((len(images), side * side * 3), dtype=np.float32)
    for i in range(len(images)):  # filled in place: a list of rows then a stack would need twice the memory
        small = images[i].convert("RGB").resize((side, side), Image.Resampling.BILINEAR)
        out[i] = np.asarray(small, dtype=np.float32).reshape(-1)
    out /= 255.0
    return out


def _owning_module(encode: Callable) -> torch.nn.Module | None:
    """The nn.Module behind `encode` (the module itself or the owner of a bound method such as encode_image)."""
    if isinstance(encode, torch.nn.Module):
        return encode
    owner = getattr(encode, "__self__", None)
    return owner if isinstance(owner, torch.nn.Module) else None


def embedding_features(
    encode: Callable[[torch.Tensor], torch.Tensor],
    images: Sequence[Image.Image],
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int = 64,
) -> np.ndarray:
    """L2-normalised embeddings [N, D] float32 of images; encode maps a batch [B, C, H, W] to [B, D].

    Runs under no_grad with the owning module in eval mode (restored afterwards), on that module's device.
    """
    if len(images) == 0:
        raise FsynthError("no images to embed for the partition; check the real and synthetic sets")
    module = _owning_module(encode)
    was_training = module.training if module is not None else False
    param = next(module.parameters(), None) if module is not None else None
    device = param.device if param is not None else torch.device("cpu")
    chunks = []
    try:
        if module is not None:
            module.eval()  # dropout or batch-norm statistics must not make the regions depend on batching
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                batch = [transform(images[i]) for i in range(start, min(start + batch_size, len(images)))]
                z = encode(torch.stack(batch).to(device))
                if z.ndim != 2:
                    raise FsynthError(f"the encoder returned shape {tuple(z.shape)}; it must return [batch, dim]")
                chunks.append(F.normalize(z.float(), dim=1).cpu())
    finally:
        if module is not None:
            module.train(was_training)
    return torch.cat(chunks).numpy().astype(np.float32, copy=False)


# ------------------------------------------------------------------------------------------------------------ regions


@dataclass(frozen=True)
class Regions:
    """The region of every sample, keyed by sample id: ids (N), assignments int64 [N] in [0, k), provenance info."""

    ids: tuple[str, ...]
    assignments: np.ndarray
    k: int
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        ids = tuple(str(i) for i in self.ids)
        assignments = np.array(self.assignments, dtype=np.int64).reshape(-1)
        assignments.setflags(write=False)
        if len(ids) != len(assignments):
            raise FsynthError(f"regions have {len(ids)} ids but {len(assignments)} assignments; they must match")
        if len(set(ids)) != len(ids):
            dup = next(i for i, count in Counter(ids).items() if count > 1)
            raise FsynthError(f"sample id {dup!r} appears twice; regions are joined by id, so ids must be unique")
        if self.k < 1 or (len(assignments) and not 0 <= assignments.min() <= assignments.max() < self.k):
            raise FsynthError(f"region assignments must lie in [0, {self.k}); the partition is corrupt")
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "assignments", assignments)
        object.__setattr__(self, "k", int(self.k))
        object.__setattr__(self, "info", dict(self.info))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Regions):
            return NotImplemented
        same = self.ids == other.ids and self.k == other.k and self.info == other.info
        return same and np.array_equal(self.assignments, other.assignments)

    def __repr__(self) -> str:
        return f"Regions(n={len(self.ids)}, k={self.k}, info={self.info!r})"

    @cached_property
    def _position(self) -> dict[str, int]:
        return {sample_id: i for i, sample_id in enumerate(self.ids)}

    def lookup(self, ids: Sequence[str]) -> np.ndarray:
        """Regions int64 [len(ids)] of the given sample ids, joined by id (never by position)."""
        position = self._position
        missing = [i for i in ids if i not in position]
        if missing:
            raise FsynthError(
                f"{len(missing)} of {len(ids)} sample ids are not in the partition (first: {missing[0]!r}); "
                "rebuild the regions for this real and synthetic set"
            )
        return self.assignments[np.fromiter((position[i] for i in ids), dtype=np.int64, count=len(ids))]

    def save(self, directory: str | Path) -> Path:
        """Write regions.npz (ids, assignments) and regions.json (k, info) into directory; returns it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / "regions.npz", "wb") as f:
            np.savez(f, ids=np.array(self.ids, dtype=np.str_), assignments=self.assignments)
        (directory / "regions.json").write_text(_dumps({"k": self.k, "info": self.info}, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Regions:
        """Read what `save` wrote."""
        directory = Path(directory)
        try:
            meta = json.loads((directory / "regions.json").read_text())
            with np.load(directory / "regions.npz", allow_pickle=False) as data:
                ids, assignments = data["ids"].tolist(), data["assignments"]
        except (OSError, ValueError, KeyError) as exc:
            raise FsynthError(f"cannot read regions from {directory} ({exc}); delete it to rebuild") from None
        return cls(tuple(ids), assignments, meta["k"], meta["info"])


def build_static_regions(
    ids: Sequence[str],
    features: np.ndarray,
    k: int,
    *,
    iterations: int,
    seed: int,
    backend: str = "auto",
    features_kind: str,
) -> Regions:
    """K-means regions of the samples `ids` from their features [N, D] (row i belongs to ids[i])."""
    features = np.asarray(features)
    if len(ids) != len(features):
        raise FsynthError(f"{len(ids)} sample ids but {len(features)} feature rows; they must match one to one")
    info: dict[str, Any] = {"features": features_kind, "num_points": len(ids), "dim": int(features.shape[1])}
    if k == 1:  # a single region needs no clustering
        info.update(backend="none", iterations_requested=0, iterations_run=0, seed=seed)
        return Regions(tuple(ids), np.zeros(len(ids), dtype=np.int64), 1, info)
    result = kmeans(features, k, iterations=iterations, seed=seed, backend=backend)
    info.update(
        backend=result.backend,
        iterations_requested=iterations,
        iterations_run=result.iterations_run,
        inertia=result.inertia,
        seed=seed,
    )
    return Regions(tuple(ids), result.assignments, k, info)


# -------------------------------------------------------------------------------------------------------------- cache


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    # A repr fallback could embed memory addresses and make the key differ from run to run.
    raise TypeError(f"cache key part of type {type(obj).__name__} is not JSON-serialisable; pass plain values")


def _dumps(obj: Any, **kwargs: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=_jsonable, **kwargs)


def cache_key(parts: dict) -> str:
    """sha256 hex digest (all 64 hex) of the canonical JSON (sorted keys) of everything that determines an artefact.

    The compact separators and the strict `_jsonable` fallback are part of the key: the text is built here and
    passed to `content_key` as is, so the keys of caches already on disk keep their value."""
    return content_key(_dumps(parts, separators=(",", ":")), n=64)


def _load_cached(final: Path, key: str) -> Regions:
    try:
        stored = json.loads((final / "key.json").read_text()).get("key")
    except (OSError, ValueError) as exc:
        raise FsynthError(f"cannot read cache directory {final} ({exc}); delete it to rebuild") from None
    if stored != key:
        raise FsynthError(f"cache directory {final} holds a different key ({stored}); delete it to rebuild")
    return Regions.load(final)


def ensure_regions(cache_dir: str | Path, key_parts: dict, compute: Callable[[], Regions],
                   log: Callable[[str], None] | None = None) -> Regions:
    """The regions cached under cache_dir/regions-<key[:16]>/, computing and publishing them if absent.

    key_parts must hold everything that determines the regions (sample ids, feature spec, K, iterations, seed,
    backend). Concurrent callers of the same key (trials starting together) compute them once: the others wait
    on the artefact's lock and load what it published. Publication is one atomic rename of a complete temporary
    sibling, so a reader never sees a partial directory, even from a builder that was killed.
    """
    cache_dir = Path(cache_dir).resolve()  # Tune and Train change the working directory
    key = cache_key(key_parts)
    final = cache_dir / f"regions-{key[:16]}"
    regions, _ = ensure_built(final, lambda: _load_cached(final, key) if final.is_dir() else None,
                              lambda: _publish(compute(), final, key, key_parts), log)
    return regions


def _publish(regions: Regions, final: Path, key: str, key_parts: dict) -> Regions:
    """Write `regions` to `final` through a temporary sibling and one rename; return the published copy."""

    def fill(tmp: Path) -> None:
        regions.save(tmp)
        (tmp / "key.json").write_text(_dumps({"key": key, "parts": key_parts}, indent=2))

    # replace=False: a copy already there (content-addressed: the same regions) is kept, never swapped under readers.
    publish_dir(final, fill, replace=False)
    # Every caller returns the published copy, so all see the same (JSON-normalised) info.
    return _load_cached(final, key)


# ---------------------------------------------------------------------------------------------- online (MacQueen)


class OnlinePartitioner:
    """Centroids [K, D] updated from synthetic samples with MacQueen's rule c <- (1 - 1/n_c) c + (1/n_c) x."""

    def __init__(self, centroids: torch.Tensor, counts: torch.Tensor | None = None) -> None:
        """centroids [K, D]; counts [K] int64 samples each centroid already averages (default 1 each)."""
        if centroids.ndim != 2:
            raise FsynthError(f"centroids must have shape [K, D], got {tuple(centroids.shape)}")
        self.centroids = centroids.detach().float().clone()
        if counts is None:
            counts = torch.ones(len(centroids), dtype=torch.int64)
        if counts.shape != (len(centroids),):
            raise FsynthError(f"counts must have shape [{len(centroids)}], got {tuple(counts.shape)}")
        self.counts = counts.detach().to(self.centroids.device, torch.int64).clone()

    @property
    def k(self) -> int:
        return self.centroids.shape[0]

    @classmethod
    def from_features(cls, features: torch.Tensor, k: int, seed: int) -> OnlinePartitioner:
        """Start from k rows of features [N, D] picked by seeded k-means++; each centroid counts as one sample."""
        n = features.shape[0]
        if k > n:
            raise FsynthError(f"K = {k} regions but only {n} points; lower partition.cluster_multiple or add images")
        x = features.detach().float().cpu()
        picks = _kmeanspp_indices(x, k, torch.Generator().manual_seed(seed))
        return cls(features.detach()[picks].float())

    def _prepare(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 2 or features.shape[1] != self.centroids.shape[1]:
            raise FsynthError(f"features must have shape [B, {self.centroids.shape[1]}], got {tuple(features.shape)}")
        return features.detach().to(self.centroids.device, self.centroids.dtype)

    @torch.no_grad()
    def assign(self, features: torch.Tensor) -> torch.Tensor:
        """Nearest centroid (squared L2) int64 [B] of features [B, D]; changes nothing."""
        x = self._prepare(features)
        return _sq_dists(x, self.centroids, (x * x).sum(1)).argmin(1).to(features.device)

    @torch.no_grad()
    def update(self, features: torch.Tensor, assignments: torch.Tensor) -> None:
        """Fold features [B, D] into their assigned centroids (assignments int64 [B]) by MacQueen's rule.

        Equal to applying the rule sample by sample: a centroid with n samples that receives m new points x_j
        becomes (n c + sum x_j) / (n + m), computed as c + (sum x_j - m c) / (n + m) to avoid large intermediates.
        """
        x = self._prepare(features)
        a = assignments.to(self.centroids.device, torch.int64).reshape(-1)
        if len(a) != len(x) or (len(a) and not 0 <= int(a.min()) <= int(a.max()) < self.k):
            raise FsynthError(f"update needs one assignment in [0, {self.k}) per sample, got {len(a)} for {len(x)}")
        m = torch.bincount(a, minlength=self.k)
        sums = torch.zeros_like(self.centroids).index_add_(0, a, x)
        total = (self.counts + m).to(self.centroids.dtype)[:, None]
        self.centroids += (sums - m.to(self.centroids.dtype)[:, None] * self.centroids) / total
        self.counts += m

    def state_dict(self) -> dict[str, torch.Tensor]:
        """{'centroids': [K, D], 'counts': [K]} copies, for checkpoints."""
        return {"centroids": self.centroids.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what state_dict returned."""
        restored = OnlinePartitioner(state["centroids"], state["counts"])
        self.centroids, self.counts = restored.centroids, restored.counts
