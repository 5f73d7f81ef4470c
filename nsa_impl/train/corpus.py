"""The training corpus: bytes of text files, one document per file, a deterministic eval split.

Default: the ``.py`` sources of the running Python's standard library (``sysconfig``'s
``stdlib`` path, ``site-packages``/``dist-packages`` excluded): real text present on every
machine that runs this code, with no download and no tokenizer (byte-level, vocabulary 256).
``paths`` replaces it with the user's own files and directories (every regular, non-hidden file
below a directory, recursively).

The split is by document and does not depend on the seed: documents are ranked by the CRC-32 of
their relative path and the lowest ``max(1, round(eval_fraction * N))`` go to evaluation, so the
same files are held out on every run and every machine with the same files.
"""

from __future__ import annotations

import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

#: Byte-level tokens.
VOCAB_SIZE = 256
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class Corpus:
    """Documents as uint8 CPU tensors, split into train and eval.

    Attributes:
        train, eval: the documents.
        train_names, eval_names: their relative paths (same order).
        source: what was read (for the run summary).
    """

    train: list[torch.Tensor]
    eval: list[torch.Tensor]
    train_names: list[str]
    eval_names: list[str]
    source: str

    @property
    def train_bytes(self) -> int:
        """Bytes in the training documents."""
        return sum(int(d.numel()) for d in self.train)

    @property
    def eval_bytes(self) -> int:
        """Bytes in the evaluation documents."""
        return sum(int(d.numel()) for d in self.eval)


def stdlib_root() -> Path:
    """The standard library directory of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[tuple[str, Path]]:
    """``(relative path, path)`` of every ``.py`` file of the standard library, sorted."""
    root = stdlib_root()
    files = [
        (p.relative_to(root).as_posix(), p)
        for p in root.rglob("*.py")
        if p.is_file() and not (_EXCLUDED_DIRS & set(p.relative_to(root).parts))
    ]
    return sorted(files)


def user_files(paths: list[str]) -> list[tuple[str, Path]]:
    """``(name, path)`` of the given files and of the regular non-hidden files below the
    given directories, sorted by name. Raises ``FileNotFoundError`` for a missing path."""
    found = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            found.append((path.as_posix(), path))
        elif path.is_dir():
            for p in path.rglob("*"):
                rel = p.relative_to(path)
                if p.is_file() and not any(part.startswith(".") for part in rel.parts):
                    found.append(((path / rel).as_posix(), p))
        else:
            raise FileNotFoundError(f"--data {raw!r}: no such file or directory")
    return sorted(set(found))


def _read(path: Path) -> torch.Tensor:
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)


def load_corpus(
    paths: list[str] | None = None,
    *,
    eval_fraction: float = 0.02,
    max_train_bytes: int | None = None,
) -> Corpus:
    """Read the corpus (module docstring) and split it.

    Args:
        paths: files/directories of the user's text (``None``: the standard library sources).
        eval_fraction: share of documents held out, in ``(0, 1)``.
        max_train_bytes: keep training documents (in path order) only until this many bytes
            (quick runs); ``None``: all. The eval split is not affected.

    Raises:
        ValueError: fewer than two non-empty documents, or a bad fraction/size.
    """
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    if max_train_bytes is not None and max_train_bytes <= 0:
        raise ValueError(f"max_train_bytes must be positive, got {max_train_bytes}")
    files = stdlib_files() if paths is None else user_files(paths)
    source = f"Python standard library sources ({stdlib_root()})" if paths is None else str(paths)
    files = [(name, path) for name, path in files if path.stat().st_size > 0]  # no empty docs
    if len(files) < 2:
        raise ValueError(
            f"the corpus ({source}) needs at least two non-empty files (one is held out for "
            f"evaluation), found {len(files)}"
        )
    # The split needs only the names, so a capped run reads only the files it uses.
    n_eval = min(len(files) - 1, max(1, round(eval_fraction * len(files))))
    ranked = sorted(range(len(files)), key=lambda i: (zlib.crc32(files[i][0].encode()), i))
    held_out = set(ranked[:n_eval])
    evals = [(n, _read(p)) for i, (n, p) in enumerate(files) if i in held_out]
    train, total = [], 0
    for i, (name, path) in enumerate(files):
        if i in held_out:
            continue
        if max_train_bytes is not None and total >= max_train_bytes:
            break
        doc = _read(path)
        if max_train_bytes is not None:
            doc = doc[: max_train_bytes - total]
        train.append((name, doc))
        total += doc.numel()
    return Corpus(
        [d for _, d in train], [d for _, d in evals], [n for n, _ in train], [n for n, _ in evals],
        source,
    )  # fmt: skip
