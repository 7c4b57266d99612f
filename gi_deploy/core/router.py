"""The source router's format and its runtime half, numpy only (no torch, no onnxruntime): the
cheap global image features it decides on, the fitted linear classifier, and reading the
verified artifact ``deploy/_router/``.

Why these features and this classifier: what tells capsule from conventional endoscopy frames
(and one device from another) is global and low-frequency: the field of view's shape (a round
capsule mask, black side bands), vignetting, the colour cast of the light and optics (bile tint,
white light), and the sensor's sharpness. A 32x32 RGB thumbnail keeps all of it, and on it we
compute colour histograms, a 4x4 grid of colour means (spatial colour moments, which capture the
field-of-view mask), radial ring statistics (vignette, border darkness), global colour moments,
chromaticity and gradient energy (blur / resolution). ~90 numbers, standardised, then a
multinomial logistic regression: a (F, S) matrix product per image, microseconds next to a CNN,
and the decode already in the pipeline resizes the frame (a 32x32 bilinear resize of the decoded
image is the only extra pixel work).

Layout of ``deploy/_router/``::

    router.npz      mean, scale (feature standardisation), weights (F, S), bias (S,), sources (S,)
                    (the order of the weights' columns), novelty_means (S, F),
                    novelty_precisions (S, F, F), novelty_thresholds (S,)
    manifest.json   format, sources, feature spec (thumbnail preprocessing, names), classifier
                    settings, sha256 of router.npz, the gate (held-out validation routing accuracy),
                    ``novelty`` (per source: threshold, shrinkage, validation/training accepted share),
                    and the seal over all of it (:class:`RouterManifest`)

The novelty check (router space): the linear classifier always picks a source, even for a blank,
saturated or striped frame. So per source we also keep a Gaussian of its standardised router
features (mean and a Ledoit-Wolf precision, core/ood.py) with a threshold at the 99% quantile of
that source's validation images' squared Mahalanobis distance. An image is "like no source" when
its distance over threshold exceeds 1 for every source: ``novelty`` = min over sources of
distance / threshold. Such frames have histograms, ring statistics and gradient energy nothing
like any device's, so this catches them before any model sees them. (A router written before the
check had no novelty arrays; it is format 1, refused now with the command that rewrites it.)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from gi_deploy._io import read_json, sha256_file
from gi_deploy.core.metrics import softmax
from gi_deploy.core.ood import IdStats
from gi_deploy.core.preprocess import PreprocessSpec
from gi_deploy.core.records import Fields, FileEntry, as_dict, seal_of
from gi_deploy.core.records import check_seal as check_seal_of
from gi_deploy.errors import BundleError

ROUTER_DIR = "_router"  # under the deploy folder; core/bundles.list_bundles never lists it
ROUTER_FORMAT = "gi-deploy-router"
ROUTER_FORMAT_VERSION = 2  # 2: sealed manifest (core/records.py), the source order also inside router.npz
ROUTER_FILE = "router.npz"
ROUTER_MANIFEST = "manifest.json"
FEATURE_VERSION = 1
THUMB_PX = 32
# The thumbnail every router feature is computed on: [0, 1] RGB (mean 0, std 1 leaves x/255).
ROUTER_SPEC = PreprocessSpec(
    size=(THUMB_PX, THUMB_PX), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bilinear", resize="direct"
)
HIST_BINS = 8
GRID = 4
RINGS = 4
DARK = 0.06  # a pixel below this luminance is "black" (a mask, a vignette, a blank frame)
NOVELTY_TPR = 0.99  # share of each source's own validation images the router's novelty check accepts
NOVELTY_KEYS = ("novelty_means", "novelty_precisions", "novelty_thresholds")


def router_gate_text(gate: dict) -> str:
    """The router's gate as the export and the demo print it: what it measured and exactly what it
    was held to (the goal, or all but one image where too few validation images resolve it)."""
    text = (
        f"held-out routing accuracy {gate['accuracy']:.2%} on {gate['n']} validation images, gate >= "
        f"{gate['min_accuracy']:.2%}"
    )
    if gate.get("small_val"):
        text += f" (all but one image: too few to resolve the {gate.get('goal', 0.99):.0%} goal, --allow-small-val)"
    return text


def feature_names() -> list[str]:
    names = [f"hist_{c}{b}" for c in "rgb" for b in range(HIST_BINS)]
    names += [f"grid{i}{j}_{c}" for i in range(GRID) for j in range(GRID) for c in "rgb"]
    names += [f"ring{r}_{w}" for r in range(RINGS) for w in ("lum", "dark")]
    names += [f"{m}_{c}" for m in ("mean", "std") for c in "rgb"]
    names += ["chroma_r", "chroma_g", "grad_r", "grad_g", "grad_b"]
    return names


def _ring_index(size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = (size - 1) / 2
    r = np.sqrt((yy - c) ** 2 + (xx - c) ** 2) / (np.sqrt(2) * c)  # 0 at the centre, 1 in the corners
    return np.minimum((r * RINGS).astype(int), RINGS - 1)


def router_features(thumbs: np.ndarray) -> np.ndarray:
    """float32 (N, 3, 32, 32) thumbnails in [0, 1] (``ROUTER_SPEC``) -> float32 (N, F) features
    (names: :func:`feature_names`). uint8 pixels, NCHW or NHWC, are accepted as well (a decoder
    that hands the backend raw pixels). Raises BundleError for another shape."""
    x = np.asarray(thumbs)
    if x.ndim == 4 and x.shape[-1] == 3 and x.shape[1] != 3:  # NHWC
        x = x.transpose(0, 3, 1, 2)
    x = x.astype(np.float32) * (1.0 / 255.0) if x.dtype == np.uint8 else x.astype(np.float32, copy=False)
    if x.ndim != 4 or x.shape[1:] != (3, THUMB_PX, THUMB_PX):
        raise BundleError(f"router features need (N, 3, {THUMB_PX}, {THUMB_PX}) thumbnails, got {x.shape}")
    n = len(x)
    x = np.clip(x, 0.0, 1.0)
    flat = x.reshape(n, 3, -1)
    bins = np.minimum((flat * HIST_BINS).astype(np.int64), HIST_BINS - 1)
    hist = np.stack([(bins == b).mean(axis=2) for b in range(HIST_BINS)], axis=2).reshape(n, -1)  # (N, 3*B)
    cell = THUMB_PX // GRID
    grid = x.reshape(n, 3, GRID, cell, GRID, cell).mean(axis=(3, 5)).transpose(0, 2, 3, 1).reshape(n, -1)
    lum = x.mean(axis=1).reshape(n, -1)
    ring = _ring_index(THUMB_PX).reshape(-1)
    rings = []
    for r in range(RINGS):
        sel = lum[:, ring == r]
        rings += [sel.mean(axis=1), (sel < DARK).mean(axis=1)]
    mean, std = flat.mean(axis=2), flat.std(axis=2)
    total = flat.sum(axis=1).sum(axis=1) + 1e-6
    chroma = flat.sum(axis=2)[:, :2] / total[:, None]
    grad = np.abs(np.diff(x, axis=2)).mean(axis=(2, 3)) + np.abs(np.diff(x, axis=3)).mean(axis=(2, 3))
    return np.concatenate([hist, grid, np.stack(rings, axis=1), mean, std, chroma, grad], axis=1).astype(np.float32)


@dataclass
class Router:
    """A fitted router: standardisation, then a linear softmax classifier over ``sources``."""

    sources: list[str]
    mean: np.ndarray  # (F,)
    scale: np.ndarray  # (F,)
    weights: np.ndarray  # (F, S)
    bias: np.ndarray  # (S,)
    manifest: RouterManifest | None = None
    path: Path | None = None
    # per source, on standardised features: one-class Mahalanobis with its 99% validation threshold;
    # None for a router written before the novelty check
    novelty: list[IdStats] | None = None

    @property
    def spec(self) -> PreprocessSpec:
        return ROUTER_SPEC

    def probabilities_of_features(self, feats: np.ndarray) -> np.ndarray:
        return softmax(((feats - self.mean) / self.scale) @ self.weights + self.bias)

    def novelty_of_features(self, feats: np.ndarray) -> np.ndarray:
        """(N, F) router features -> (N,) min over sources of Mahalanobis / that source's threshold:
        over 1 means no source's frames look like this image (nan without a novelty model)."""
        if self.novelty is None:
            return np.full(len(feats), np.nan)
        z = (np.asarray(feats, np.float64) - self.mean) / self.scale
        return np.stack([m.score(z) / m.threshold for m in self.novelty], axis=1).min(axis=1)

    def route(self, thumbs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Thumbnails (N, 3, 32, 32) -> (source index (N,), router confidence (N,))."""
        idx, conf, _ = self.route_with_novelty(thumbs)
        return idx, conf

    def route_with_novelty(self, thumbs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Thumbnails -> (source index, router confidence, novelty ratio (nan: no novelty model)),
        from one feature computation."""
        feats = router_features(thumbs)
        p = self.probabilities_of_features(feats)
        idx = p.argmax(axis=1)
        return idx, p[np.arange(len(p)), idx], self.novelty_of_features(feats)

    def arrays(self) -> dict[str, np.ndarray]:
        """What router.npz holds: the classifier, the source order its columns mean, the novelty models."""
        out = {
            "mean": self.mean,
            "scale": self.scale,
            "weights": self.weights,
            "bias": self.bias,
            "sources": np.array(self.sources),
        }
        if self.novelty is not None:
            out.update(
                novelty_means=np.stack([m.means[0] for m in self.novelty]),
                novelty_precisions=np.stack([m.precision for m in self.novelty]),
                novelty_thresholds=np.array([m.threshold for m in self.novelty]),
            )
        return out


@dataclass(frozen=True)
class RouterManifest:
    """``_router/manifest.json``, typed and sealed (core/records.py): the source order the
    classifier's columns mean, the feature spec, the gate it passed and the sha256 of router.npz
    are all covered, so an edited order, threshold or file is refused naming the field."""

    created: str
    sources: tuple[str, ...]  # column j of router.npz's weights is sources[j] (router.npz holds them too)
    images: dict  # per source: training and validation images it was fitted and gated on
    features: dict  # version, thumbnail preprocessing, names, n
    classifier: dict
    bundles: dict  # per source: the export_key of the bundle it routes to
    novelty: dict | None
    verification: dict  # {"router": the gate's numbers}
    files: dict  # {ROUTER_FILE: FileEntry}
    versions: dict
    seal: dict = field(default_factory=dict)
    format: str = ROUTER_FORMAT
    format_version: int = ROUTER_FORMAT_VERSION

    @property
    def gate(self) -> dict:
        return self.verification["router"]

    def to_dict(self) -> dict:
        d = as_dict(self)
        return {"format": d.pop("format"), "format_version": d.pop("format_version"), **d}

    def sealed(self) -> RouterManifest:
        d = replace(self, seal={}).to_dict()
        d.pop("seal")
        return replace(self, seal=seal_of(d))

    @classmethod
    def from_dict(cls, d, folder: Path, check_seal: bool = True) -> RouterManifest:
        """Every field's type and range, then the seal. Raises BundleError naming the field."""
        where = Path(folder) / ROUTER_MANIFEST
        fix = f"rewrite the router with `gi-deploy export --router --out {Path(folder).parent}`"
        f = Fields(d, where, fix)
        if d.get("format") != ROUTER_FORMAT or d.get("format_version") != ROUTER_FORMAT_VERSION:
            raise BundleError(
                f"{where} is a {d.get('format')} v{d.get('format_version')} manifest, not a "
                f"{ROUTER_FORMAT} v{ROUTER_FORMAT_VERSION} (sealed) one; {fix}"
            )
        sources = f.str_list("sources", unique=True)
        if len(sources) < 2:
            raise f.bad("sources", list(sources), "must name at least two sources (a router chooses between them)")
        features = f.sub("features")
        version = features.integer("version", 1)
        if version != FEATURE_VERSION:
            raise f.bad(
                "features.version", version, f"is not the router features this gi-deploy computes (v{FEATURE_VERSION})"
            )
        features.integer("n", 1)
        bundles = f.obj("bundles")
        if sorted(bundles) != sorted(sources):
            raise f.bad("bundles", sorted(bundles), f"must name the routed sources {list(sources)}")
        gate = f.sub("verification").sub("router")
        gate.number("accuracy", 0.0, 1.0), gate.number("min_accuracy", 0.0, 1.0), gate.integer("n", 1)
        if ROUTER_FILE not in f.obj("files"):
            raise f.bad("files", sorted(f.obj("files")), f"must list {ROUTER_FILE}")
        files = {ROUTER_FILE: FileEntry.read(f.sub("files").sub(ROUTER_FILE))}
        m = cls(
            created=f.text("created"),
            sources=sources,
            images=f.obj("images"),
            features=features.data,
            classifier=f.obj("classifier"),
            bundles=bundles,
            novelty=f.obj("novelty", None),
            verification=f.obj("verification"),
            files=files,
            versions=f.obj("versions"),
            seal=f.obj("seal", {}),
        )
        if check_seal:
            check_seal_of(d, where, fix)
        return m


def router_dir(deploy_dir: Path) -> Path:
    return Path(deploy_dir) / ROUTER_DIR


def load_router(deploy_dir: Path, check_hash: bool = True) -> Router:
    """The verified router of ``deploy_dir``. Raises BundleError when there is none (with the
    command that writes one), when its manifest is of another format, malformed or edited (the
    seal: naming the field), when router.npz does not match the sha256 in it, or when the arrays
    disagree with the manifest (the source order stored in both, the classifier's width)."""
    folder = router_dir(deploy_dir)
    manifest_path = folder / ROUTER_MANIFEST
    if not manifest_path.is_file():
        raise BundleError(
            f"--source auto needs a router, and {deploy_dir} has none ({folder} is missing): write "
            f"one with `gi-deploy export --router --out {deploy_dir}` (it fits on the bundles' training "
            "images; bundles exported before gi-deploy learnt routing also need re-exporting for the "
            "in-distribution check)"
        )
    m = RouterManifest.from_dict(read_json(manifest_path, "router manifest"), folder)
    fix = f"rewrite it with `gi-deploy export --router --out {deploy_dir}`"
    path = folder / ROUTER_FILE
    if not path.is_file() or path.is_symlink():
        raise BundleError(f"router file missing (or a link): {path}; {fix}")
    if check_hash and sha256_file(path) != m.files[ROUTER_FILE].sha256:
        raise BundleError(f"{path} does not match the sha256 in its manifest: it was changed after export; {fix}")
    try:
        with np.load(path) as z:
            arrays = {k: z[k].astype(np.float32) for k in ("mean", "scale", "weights", "bias")}
            stored = [str(s) for s in z["sources"]]
            novelty = None
            if all(k in z for k in NOVELTY_KEYS):
                novelty = [
                    IdStats(mu[None, :].astype(np.float64), prec.astype(np.float64), float(t))
                    for mu, prec, t in zip(z["novelty_means"], z["novelty_precisions"], z["novelty_thresholds"])
                ]
    except (OSError, ValueError, KeyError) as e:
        raise BundleError(f"{path} is not a router's arrays ({e}); {fix}") from e
    if stored != list(m.sources):
        raise BundleError(
            f"{manifest_path}: field sources = {list(m.sources)} is not the order router.npz was fitted "
            f"with ({stored}): images would go to the wrong model; {fix}"
        )
    n_feat, n_src = len(feature_names()), len(m.sources)
    shapes = {"mean": (n_feat,), "scale": (n_feat,), "weights": (n_feat, n_src), "bias": (n_src,)}
    wrong = [f"{k} {arrays[k].shape} (expected {v})" for k, v in shapes.items() if arrays[k].shape != v]
    if novelty is not None and len(novelty) != n_src:
        wrong.append(f"novelty for {len(novelty)} sources (expected {n_src})")
    if wrong:
        raise BundleError(f"{path} does not fit {n_src} sources and {n_feat} features: {', '.join(wrong)}; {fix}")
    return Router(sources=list(m.sources), manifest=m, path=folder, novelty=novelty, **arrays)
