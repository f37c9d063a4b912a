"""Partition: k-means backends (real FAISS), features, id-joined regions, the regions cache, online MacQueen."""

import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from PIL import Image

from fsynth.errors import FsynthError
from fsynth.partition import (
    KMeansResult,
    OnlinePartitioner,
    Regions,
    build_static_regions,
    cache_key,
    embedding_features,
    ensure_regions,
    kmeans,
    num_regions,
    pixel_features,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # torch and faiss-cpu each ship their own libgomp; on a busy 2-core machine their spinning thread pools slow
    # these small problems down many times over, so the tests run single-threaded.
    torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(torch_threads)
    faiss.omp_set_num_threads(faiss_threads)


def blobs(n_blobs=5, per_blob=60, dim=8, seed=0):
    """Well-separated Gaussian blobs: features float32 [n_blobs * per_blob, dim] and the blob of each row."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_blobs, dim)) * 20.0
    labels = np.repeat(np.arange(n_blobs), per_blob)
    return (centres[labels] + rng.normal(size=(len(labels), dim))).astype(np.float32), labels


def test_num_regions():
    assert num_regions("single", 4.0, 47) == 1
    assert num_regions("static", 2.0, 47) == 94
    assert num_regions("online", 1.0, 10) == 10
    assert num_regions("static", 0.01, 10) == 1
    with pytest.raises(FsynthError, match="unknown partition.mode"):
        num_regions("kmeans", 2.0, 10)


# ----------------------------------------------------------------------------------------------------------- k-means


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_kmeans_deterministic_for_a_seed_and_seeds_differ(backend):
    x = np.random.default_rng(1).random((400, 6), dtype=np.float32)
    a = kmeans(x, 8, iterations=20, seed=3, backend=backend)
    b = kmeans(x, 8, iterations=20, seed=3, backend=backend)
    c = kmeans(x, 8, iterations=20, seed=4, backend=backend)
    assert isinstance(a, KMeansResult) and a.backend == backend
    assert a.centroids.dtype == np.float32 and a.centroids.shape == (8, 6)
    assert a.assignments.dtype == np.int64 and a.assignments.shape == (400,)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    np.testing.assert_array_equal(a.assignments, b.assignments)
    assert a.inertia == b.inertia
    assert not np.array_equal(a.centroids, c.centroids)


def test_faiss_runs_every_requested_iteration():
    x, _ = blobs()
    plain = faiss.Kmeans(x.shape[1], 5, niter=300, seed=0)  # FAISS >= 1.15 defaults: stops once converged
    plain.train(x)
    assert len(plain.iteration_stats) < 300  # the premise: without the fix this problem stops early
    result = kmeans(x, 5, iterations=300, seed=0, backend="faiss")
    assert result.iterations_run == 300


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_kmeans_recovers_separated_blobs(backend):
    x, labels = blobs()
    result = kmeans(x, 5, iterations=50, seed=0, backend=backend)
    assert result.iterations_run == 50
    clusters = [set(result.assignments[labels == b].tolist()) for b in range(5)]
    assert all(len(c) == 1 for c in clusters)  # every blob falls in one cluster ...
    assert len(set.union(*clusters)) == 5  # ... and no two blobs share one
    assert result.inertia == pytest.approx(float(((x - result.centroids[result.assignments]) ** 2).sum()), rel=1e-4)


def test_backends_agree_from_the_shared_initialisation():
    x = np.random.default_rng(2).normal(size=(300, 5)).astype(np.float32)
    a = kmeans(x, 6, iterations=30, seed=1, backend="faiss")
    b = kmeans(x, 6, iterations=30, seed=1, backend="torch")
    assert np.mean(a.assignments == b.assignments) > 0.98
    assert a.inertia == pytest.approx(b.inertia, rel=1e-3)


def test_more_regions_than_points_is_a_one_line_error():
    x = np.zeros((50, 4), dtype=np.float32)
    with pytest.raises(FsynthError) as info:
        kmeans(x, 94)
    message = str(info.value)
    assert "K = 94 regions but only 50 points" in message and "cluster_multiple" in message
    assert "\n" not in message


# ---------------------------------------------------------------------------------------------------------- features


def test_pixel_features_shape_range_and_layout():
    red = Image.new("RGB", (40, 30), (255, 0, 0))
    grey = Image.new("L", (17, 17), 128)
    feats = pixel_features([red, grey, red], side=6)
    assert feats.shape == (3, 6 * 6 * 3) and feats.dtype == np.float32
    assert feats.min() >= 0.0 and feats.max() <= 1.0
    np.testing.assert_allclose(feats[0].reshape(6, 6, 3), np.broadcast_to([1.0, 0.0, 0.0], (6, 6, 3)))
    np.testing.assert_allclose(feats[1], 128 / 255, rtol=1e-6)


class TinyEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = torch.nn.Dropout(0.5)  # in train mode this would make the features random
        self.proj = torch.nn.Linear(3 * 4 * 4, 5)

    def encode_image(self, x):
        return self.proj(self.drop(x.flatten(1)))


def to_tensor(image):
    array = np.asarray(image.convert("RGB").resize((4, 4)), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)


def test_embedding_features_normalised_in_eval_mode():
    torch.manual_seed(0)
    model = TinyEncoder().train()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)) for _ in range(7)]
    feats = embedding_features(model.encode_image, images, to_tensor, batch_size=3)
    assert feats.shape == (7, 5) and feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)
    assert model.training  # the caller's mode is restored
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.proj(torch.stack([to_tensor(i) for i in images]).flatten(1)))
    np.testing.assert_allclose(feats, expected.numpy(), atol=1e-6)
    one_batch = embedding_features(model.encode_image, images, to_tensor, batch_size=64)
    np.testing.assert_allclose(one_batch, feats, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------- regions


def make_regions(n=20, k=4, info=None):
    return Regions(tuple(f"img{i:03d}" for i in range(n)), np.arange(n) % k, k, info or {"backend": "test"})


def test_lookup_joins_by_id_not_by_order():
    regions = make_regions()
    perm = np.random.default_rng(0).permutation(len(regions.ids))
    shuffled = [regions.ids[i] for i in perm]
    found = regions.lookup(shuffled)
    assert found.dtype == np.int64
    np.testing.assert_array_equal(found, regions.assignments[perm])
    assert not np.array_equal(found, regions.assignments)  # an order-based join would be wrong here
    np.testing.assert_array_equal(found[np.argsort(perm)], regions.assignments)  # ... and right only once reordered


def test_lookup_of_unknown_ids_names_count_and_first():
    regions = make_regions()
    with pytest.raises(FsynthError, match=r"2 of 3 sample ids are not in the partition \(first: 'new1'\)") as info:
        regions.lookup(["img001", "new1", "new2"])
    assert "\n" not in str(info.value)


def test_regions_validate_their_input():
    with pytest.raises(FsynthError, match="'a' appears twice"):
        Regions(("a", "b", "a"), np.zeros(3), 1)
    with pytest.raises(FsynthError, match=r"must lie in \[0, 2\)"):
        Regions(("a", "b"), np.array([0, 2]), 2)


def test_save_load_round_trip(tmp_path):
    regions = make_regions(info={"backend": "faiss", "iterations_run": 300, "inertia": 1.25, "features": "pixels"})
    loaded = Regions.load(regions.save(tmp_path / "r"))
    assert loaded == regions
    assert loaded.assignments.dtype == np.int64 and isinstance(loaded.ids, tuple)
    with pytest.raises(FsynthError, match="cannot read regions"):
        Regions.load(tmp_path / "missing")


def test_build_static_regions(tmp_path):
    x, labels = blobs()
    ids = [f"s{i}" for i in range(len(x))]
    regions = build_static_regions(ids, x, 5, iterations=40, seed=0, backend="torch", features_kind="embedding")
    assert regions.k == 5 and regions.info["features"] == "embedding"
    assert regions.info["backend"] == "torch" and regions.info["iterations_run"] == 40
    assert len(set(regions.lookup(ids[:60]).tolist())) == 1  # the first blob is one region
    single = build_static_regions(ids, x, 1, iterations=300, seed=0, features_kind="pixels")
    assert single.k == 1 and not single.assignments.any() and single.info["iterations_run"] == 0
    with pytest.raises(FsynthError, match="one to one"):
        build_static_regions(ids[:-1], x, 5, iterations=5, seed=0, features_kind="embedding")


# ------------------------------------------------------------------------------------------------------------- cache


def test_cache_key_is_canonical():
    key = cache_key({"k": 94, "features": "embedding", "seed": np.int64(0)})
    assert len(key) == 64 and int(key, 16) >= 0
    assert key == cache_key({"seed": 0, "features": "embedding", "k": 94})
    assert key != cache_key({"seed": 1, "features": "embedding", "k": 94})
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        cache_key({"f": object()})


def test_ensure_regions_computes_once_per_key(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return make_regions(info={"call": len(calls)})

    first = ensure_regions(tmp_path, {"k": 4, "seed": 0}, compute)
    again = ensure_regions(tmp_path, {"seed": 0, "k": 4}, compute)
    assert len(calls) == 1 and again == first
    other = ensure_regions(tmp_path, {"k": 4, "seed": 1}, compute)
    assert len(calls) == 2 and other.info == {"call": 2}
    names = {s: f"regions-{cache_key({'k': 4, 'seed': s})[:16]}" for s in (0, 1)}
    assert visible(tmp_path) == sorted(names.values())
    provenance = json.loads((tmp_path / names[0] / "key.json").read_text())
    assert provenance == {"key": cache_key({"k": 4, "seed": 0}), "parts": {"k": 4, "seed": 0}}


def race_worker(cache_dir, barrier, queue):
    """One of several processes asking for the same regions at once (spawned, so module level)."""
    torch.set_num_threads(1)

    def compute():
        with open(Path(cache_dir) / "builds.txt", "a") as f:  # one line per process that computed
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)  # the others arrive while this one computes
        return Regions(("a", "b", "c"), np.array([0, 1, 0]), 2, {"pid": os.getpid()})

    barrier.wait(timeout=120)  # every process asks at the same moment
    regions = ensure_regions(cache_dir, {"what": "race"}, compute)
    queue.put((regions.ids, regions.assignments.tolist(), regions.k, regions.info))


def test_ensure_regions_is_built_once_under_concurrency(tmp_path):
    """Trials that start together and ask for the same regions: one computes, the others wait and load its copy."""
    ctx = mp.get_context("spawn")
    n = 3
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=race_worker, args=(str(tmp_path), barrier, queue)) for _ in range(n)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=180) for _ in range(n)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    builders = (tmp_path / "builds.txt").read_text().split()
    assert len(builders) == 1 and int(builders[0]) in {p.pid for p in procs}  # computed exactly once
    assert all(r == results[0] for r in results) and results[0][3]["pid"] == int(builders[0])
    assert visible(tmp_path) == ["builds.txt", f"regions-{cache_key({'what': 'race'})[:16]}"]  # no leftovers


def test_published_regions_folder_keeps_the_umask_permissions(tmp_path):
    """A shared cache: the folder is readable by whoever the umask allows (mkdtemp would have made it 0700)."""
    ensure_regions(tmp_path, {"k": 2}, lambda: Regions(("a", "b"), np.array([0, 1]), 2, {}))
    umask = os.umask(0)
    os.umask(umask)
    (final,) = [tmp_path / n for n in visible(tmp_path)]
    assert final.stat().st_mode & 0o777 == 0o777 & ~umask


def visible(folder: Path) -> list[str]:
    """The entries of `folder` but hidden ones (fsynth.cache's `.locks/`, which is kept)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


# ------------------------------------------------------------------------------------------------------------ online


def test_online_assign_is_nearest_centroid_and_stateless():
    torch.manual_seed(0)
    part = OnlinePartitioner(torch.randn(6, 4))
    x = torch.randn(50, 4)
    before = part.state_dict()
    got = part.assign(x)
    assert got.dtype == torch.int64 and got.shape == (50,)
    torch.testing.assert_close(got, torch.cdist(x.double(), part.centroids.double()).argmin(1))
    torch.testing.assert_close(part.state_dict(), before)


def test_online_update_is_sequential_macqueen_and_running_mean():
    torch.manual_seed(1)
    start, counts = torch.randn(4, 3), torch.tensor([1, 3, 2, 5])
    part = OnlinePartitioner(start, counts)
    ref_c, ref_n = start.double().clone(), counts.clone()
    for _ in range(2):
        x = torch.randn(16, 3)
        a = part.assign(x)
        part.update(x, a)
        for xi, ai in zip(x.double(), a, strict=True):
            ref_n[ai] += 1
            ref_c[ai] = (1 - 1 / ref_n[ai]) * ref_c[ai] + xi / ref_n[ai]
    torch.testing.assert_close(part.centroids, ref_c.float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(part.counts, ref_n)

    fresh = OnlinePartitioner(start)  # one sample per centroid: each becomes the mean of its start and its points
    x, a = torch.randn(30, 3), torch.randint(0, 4, (30,))
    fresh.update(x[:10], a[:10])
    fresh.update(x[10:], a[10:])
    for c in range(4):
        torch.testing.assert_close(fresh.centroids[c], torch.cat([start[c : c + 1], x[a == c]]).mean(0))


def test_online_from_features_and_state_dict_round_trip():
    feats = torch.randn(40, 5)
    part = OnlinePartitioner.from_features(feats, 6, seed=2)
    same = OnlinePartitioner.from_features(feats, 6, seed=2)
    torch.testing.assert_close(part.centroids, same.centroids)
    rows = [int((feats == c).all(1).nonzero()[0, 0]) for c in part.centroids]
    assert len(set(rows)) == 6 and part.counts.tolist() == [1] * 6
    x = torch.randn(12, 5)
    part.update(x, part.assign(x))
    state = part.state_dict()
    restored = OnlinePartitioner(torch.zeros(6, 5))
    restored.load_state_dict(state)
    part.update(x, part.assign(x))  # mutating the original must not touch the saved state
    restored.update(x, restored.assign(x))
    torch.testing.assert_close(restored.state_dict(), part.state_dict())
    assert not torch.equal(state["centroids"], part.centroids)
