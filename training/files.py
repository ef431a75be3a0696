"""Writing model files so that a crash never leaves a half-written one, and the first line of an error.

Every model file this project writes (checkpoints, .onnx, OpenVINO's .xml with its .bin) goes through
write_atomically; every foreign library's error that becomes a one-line message goes through first_line.
"""
import os
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, write: Callable[[Path], None], companions: tuple[str, ...] = ()) -> None:
    """write(tmp) to a temporary name beside path, fsync it, then rename it onto path; files the writer puts beside
    tmp with the suffixes in companions (OpenVINO's .bin) are renamed first, so path never names a model whose
    companion is missing. The temporary files are removed whatever happens."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name no model-file search matches (*.pt, *.onnx); with companions it keeps the suffix the writer derives
    # their names from (OpenVINO writes x.xml and x.bin), and the leading dot hides it.
    tag = f"tmp{os.getpid()}"
    tmp = path.with_name(f".{path.stem}.{tag}{path.suffix}" if companions else f".{path.name}.{tag}")
    try:
        write(tmp)
        for file in (*(tmp.with_suffix(s) for s in companions), tmp):
            with open(file, "rb+") as f:
                os.fsync(f.fileno())
        for suffix in companions:
            os.replace(tmp.with_suffix(suffix), path.with_suffix(suffix))
        os.replace(tmp, path)
    finally:
        for file in (tmp, *(tmp.with_suffix(s) for s in companions)):
            file.unlink(missing_ok=True)
    if hasattr(os, "O_DIRECTORY"):  # the rename itself survives a power cut once the folder is synced (POSIX)
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def first_line(exc: BaseException, fallback: str | None = None) -> str:
    """An exception's first line, at most 200 characters; fallback (else its type's name) when it says nothing."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else fallback or type(exc).__name__
