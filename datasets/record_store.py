"""Millions of pretraining records in a few flat arrays instead of millions of Python objects.

A list of 5M :class:`~datasets.records.Record` costs gigabytes per process, and a forked DataLoader worker copies
every page whose objects it touches (reading an object writes its reference count): the memory is paid again per
worker. :class:`RecordStore` keeps the image paths as UTF-8 bytes in numpy buffers with offsets and the captions
zlib-compressed in blocks of ``CAPTIONS_PER_BLOCK`` against a preset dictionary (the corpus's first 32 KB of
captions, so that small blocks compress almost as well as big ones; captions are most of the bytes, and a block
decompresses in tens of microseconds, little beside an image decode); indexing builds the one Record asked for. The buffers hold no Python objects, so a forked worker shares
them with its parent for as long as it lives (copy-on-write never triggers). :func:`iter_json_list` reads a JSON
list one element at a time, so building the store never holds the whole parsed file either.

Consecutive records of one image (how every corpus lists an image's captions) share one stored path.
"""
from __future__ import annotations

import json
import os
import zlib
from array import array
from collections.abc import Sequence
from typing import Any, Iterator, overload

import numpy as np

from datasets.records import AnnotationNotFoundError, DataFormatError, Record

_CHUNK_CHARS = 1 << 20
CAPTIONS_PER_BLOCK = 8  # captions compressed together: ~2 KB of text, decompressed whole for one caption
DICTIONARY_BYTES = 32768  # zlib's preset dictionary: the first captions of the corpus (its window is 32 KB)


def _offsets(values: array) -> np.ndarray:
    """``values`` as int64, or as a uint32 copy when they fit (half the bytes: 20 MB less per 5M records)."""
    wide = np.frombuffer(values, dtype=np.int64) if len(values) else np.zeros(0, dtype=np.int64)
    if not len(wide) or int(wide.max()) < 2**32:
        return wide.astype(np.uint32)
    return wide


class RecordStore(Sequence):
    """Pretraining records: ``store[i]`` is ``Record(image_path, caption, pid=i, image_id=i)``.

    Built with :meth:`add` then :meth:`freeze` (which turns the growing buffers into read-only numpy arrays).
    Image paths are stored relative to their corpus root (``roots``) and joined when a record is built.
    """

    def __init__(self, roots: Sequence[str] = ()):
        self.roots: list[str] = list(roots)
        self._captions = bytearray()  # compressed blocks
        self._block_ends = array("q")
        self._pending = bytearray()  # the captions of the block being filled, uncompressed
        self._unsealed: list[bytes] = []  # blocks waiting for the dictionary (the first 32 KB of captions)
        self.dictionary: bytes | None = None
        self._compressor: Any = None
        self._caption_ends = array("q")  # end of each caption in the uncompressed text of all captions
        self._paths = bytearray()
        self._path_ends = array("q")
        self._path_roots = array("H")  # root of each stored path (at most 65535 corpora)
        self._record_paths = array("q")  # stored path of each record
        self._last_path: tuple[int, str] | None = None
        self.frozen = False

    def add_root(self, root: str) -> int:
        self.roots.append(root)
        return len(self.roots) - 1

    def add(self, root: int, image: str, caption: str) -> None:
        """Append one record; ``image`` relative to ``roots[root]`` (or absolute)."""
        if self._last_path != (root, image):
            self._paths += image.encode("utf-8")
            self._path_ends.append(len(self._paths))
            self._path_roots.append(root)
            self._last_path = (root, image)
        self._record_paths.append(len(self._path_ends) - 1)
        text = caption.encode("utf-8")
        self._pending += text
        self._caption_ends.append((self._caption_ends[-1] if self._caption_ends else 0) + len(text))
        if len(self._caption_ends) % CAPTIONS_PER_BLOCK == 0:
            self._close_block()

    def _close_block(self) -> None:
        self._unsealed.append(bytes(self._pending))
        self._pending = bytearray()
        self._seal()

    def _seal(self, last: bool = False) -> None:
        """Compress the blocks waiting for the dictionary once there is one (or at the end, with what there is)."""
        if self.dictionary is None:
            if sum(map(len, self._unsealed)) < DICTIONARY_BYTES and not last:
                return
            self.dictionary = b"".join(self._unsealed)[:DICTIONARY_BYTES]
        if self._compressor is None:  # primed once: copying it skips loading the dictionary for every block
            self._compressor = zlib.compressobj(6, zdict=self.dictionary)
        for text in self._unsealed:
            compressor = self._compressor.copy()
            self._captions += compressor.compress(text) + compressor.flush()
            self._block_ends.append(len(self._captions))
        self._unsealed = []

    def freeze(self) -> "RecordStore":
        """Turn the buffers into numpy arrays (no copy) and stop accepting records."""
        if len(self._caption_ends) % CAPTIONS_PER_BLOCK:
            self._unsealed.append(bytes(self._pending))
            self._pending = bytearray()
        if self._unsealed:
            self._seal(last=True)
        self.captions = np.frombuffer(self._captions, dtype=np.uint8)
        self.block_ends = _offsets(self._block_ends)
        self.caption_ends = _offsets(self._caption_ends)
        self.paths = np.frombuffer(self._paths, dtype=np.uint8)
        self.path_ends = _offsets(self._path_ends)
        self.path_roots = np.frombuffer(self._path_roots, dtype=np.uint16) if len(self._path_roots) \
            else np.zeros(0, dtype=np.uint16)
        self.record_paths = _offsets(self._record_paths)
        # the growing buffers of the offsets were copied into narrower arrays: let them go
        self._caption_ends = self._block_ends = self._path_ends = self._record_paths = None
        self._compressor = None
        self.frozen = True
        return self

    def nbytes(self) -> int:
        """Bytes held by the arrays."""
        return sum(a.nbytes for a in (self.captions, self.block_ends, self.caption_ends, self.paths, self.path_ends,
                                      self.path_roots, self.record_paths))

    def __len__(self) -> int:
        return len(self.caption_ends) if self.frozen else len(self._caption_ends)

    def caption(self, index: int) -> str:
        block = index // CAPTIONS_PER_BLOCK
        first = block * CAPTIONS_PER_BLOCK
        block_start = int(self.block_ends[block - 1]) if block else 0
        text = zlib.decompressobj(zdict=self.dictionary).decompress(
            self.captions[block_start:int(self.block_ends[block])].tobytes())
        base = int(self.caption_ends[first - 1]) if first else 0
        start = int(self.caption_ends[index - 1]) if index else 0
        return text[start - base:int(self.caption_ends[index]) - base].decode("utf-8")

    def image_path(self, index: int) -> str:
        stored = int(self.record_paths[index])
        start = int(self.path_ends[stored - 1]) if stored else 0
        image = self.paths[start:int(self.path_ends[stored])].tobytes().decode("utf-8")
        return image if os.path.isabs(image) else os.path.join(self.roots[int(self.path_roots[stored])], image)

    @overload
    def __getitem__(self, index: int) -> Record: ...

    @overload
    def __getitem__(self, index: slice) -> list[Record]: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"record {index} of a store of {n}")
        index %= n
        return Record(self.image_path(index), self.caption(index), index, index)


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def iter_json_list(path: str | os.PathLike[str], what: str = "a JSON list") -> Iterator[Any]:
    """The elements of the JSON list in ``path``, parsed one at a time (memory: one element and a 1 MB window).

    A missing file raises AnnotationNotFoundError, anything but a list or invalid JSON DataFormatError naming
    the file and the element.
    """
    decoder = json.JSONDecoder()
    try:
        handle = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise AnnotationNotFoundError(path, "an existing annotation file") from None
    with handle:
        text, pos, eof, index = "", 0, False, 0

        def refill() -> None:
            nonlocal text, pos, eof
            more = handle.read(_CHUNK_CHARS)
            eof = not more
            text, pos = text[pos:] + more, 0

        try:
            refill()
            pos = _skip_space(text, pos)
            if not text[pos:pos + 1] == "[":
                raise DataFormatError(path, what, got=repr(text[pos:pos + 20]) if text else "an empty file")
            pos += 1
            while True:
                if len(text) - pos < _CHUNK_CHARS // 2 and not eof:
                    refill()
                pos = _skip_space(text, pos)
                if text[pos:pos + 1] == "]":
                    return
                try:
                    value, end = decoder.raw_decode(text, pos)
                except json.JSONDecodeError as error:
                    if eof:
                        raise DataFormatError(path, "valid JSON", index=index, got=error.msg) from None
                    refill()  # an element longer than the window: read on
                    continue
                yield value
                index += 1
                pos = _skip_space(text, end)
                while pos >= len(text) and not eof:
                    refill()
                    pos = _skip_space(text, pos)
                if text[pos:pos + 1] == ",":
                    pos += 1
                elif text[pos:pos + 1] != "]":
                    raise DataFormatError(path, "',' or ']' after an element", index=index - 1,
                                          got=repr(text[pos:pos + 20]) if pos < len(text) else "end of file")
        except UnicodeDecodeError as error:
            raise DataFormatError(path, "UTF-8 text", got=str(error)) from None
