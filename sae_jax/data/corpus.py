"""Text corpora for harvesting activations: user files and the Debian text packages.

A corpus *spec* says where text comes from:

- ``None`` or ``"default"``: whichever Debian corpora are installed, in this order:
  ``bible-kjv`` (the King James Bible, which the package stores as a windowed-LZW
  ``bible.data`` file), ``fortunes`` (``%``-separated fortune files) and the Python HTML
  documentation (``python3.X-doc``). When none is installed, the CPython standard-library
  sources are used instead and a :class:`MissingCorpusWarning` names the missing packages
  and how to install them.
- a built-in name: ``"bible-kjv"``, ``"fortunes"``, ``"python-doc"``, ``"python-stdlib"``.
- a file, a folder (searched recursively for the spec's extensions, ``.txt`` by default),
  or a glob pattern (``**`` recurses; every match is read, whatever its extension).
- a sequence of the above, or a :class:`CorpusSpec` for full control.

Gzip files are decompressed on the fly (by magic bytes) and ``.html``/``.htm`` files are
reduced to their text with ``html.parser``. Documents come one at a time in a deterministic
order (sorted paths); plain-text files are cut into chunks of about ``chunk_chars``
characters at line boundaries, so a corpus is never held in memory whole.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import html.parser
import io
import itertools
import os
import pathlib
import re
import struct
import sysconfig
import warnings
from collections.abc import Iterator, Sequence

# Search paths, read at call time so that tests and unusual systems can override them.
BIBLE_DATA_PATHS = ("/usr/lib/bible.data", "/usr/share/bible-kjv/bible.data",
                    "/usr/lib/bible-kjv/bible.data")
FORTUNE_DIRS = ("/usr/share/games/fortunes", "/usr/share/fortunes")
PYTHON_DOC_ROOTS = ("/usr/share/doc",)
BUILTINS = ("default", "bible-kjv", "fortunes", "python-doc", "python-stdlib")
INSTALL_HINT = ("install them with `apt-get install bible-kjv fortunes python3.11-doc` "
                "(python3.13-doc on Debian 13), or pass --text PATH")
_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")
_OVERSTRIKE = re.compile(r"_+\x08|.?\x08")  # fortunes underline (___^H) and bold (x^Hx)


class MissingCorpusWarning(UserWarning):
  """The default Debian corpora are missing and a fallback corpus is used."""


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
  """Where documents come from.

  Attributes:
    sources: built-in names, files, folders or glob patterns, read in this order.
    extensions: suffixes searched for in folders (each also matches with ``.gz``).
    chunk_chars: plain-text files are cut into documents of about this many characters.
  """

  sources: tuple[str, ...] = ("default",)
  extensions: tuple[str, ...] = (".txt",)
  chunk_chars: int = 1 << 20

  def __post_init__(self):
    if not self.sources:
      raise ValueError("sources must name at least one corpus; got (). Use ('default',).")
    if not all(ext.startswith(".") for ext in self.extensions):
      raise ValueError(f"extensions must start with '.'; got {self.extensions}.")
    if self.chunk_chars < 1:
      raise ValueError(f"chunk_chars must be >= 1; got {self.chunk_chars}.")


# kind is "text", "html", "fortunes" or "bible"; files are sorted paths under root.
_Source = collections.namedtuple("_Source", "name kind root files")


SpecLike = CorpusSpec | str | os.PathLike | Sequence[str | os.PathLike] | None


def as_spec(spec: SpecLike) -> CorpusSpec:
  """Normalises ``None``, a name, a path or a sequence of them to a :class:`CorpusSpec`."""
  if spec is None or isinstance(spec, CorpusSpec):
    return spec or CorpusSpec()
  names = [spec] if isinstance(spec, (str, os.PathLike)) else spec
  return CorpusSpec(sources=tuple(os.fspath(name) for name in names))


def unlzw(data: bytes, max_bits: int = 16) -> bytes:
  """Decodes one Unix ``compress`` LZW stream in block mode, without its 3-byte header.

  Codes start 9 bits wide and grow up to ``max_bits``; code 256 clears the table. The
  encoder writes codes in groups of eight, so a width change or a clear skips the rest of
  the current group, counted from where that width began.

  References: Welch 1984, "A Technique for High-Performance Data Compression", IEEE
  Computer 17(6) (no arXiv id); the group alignment follows compress 4.0 (Thomas et al.
  1985).
  """
  if not 9 <= max_bits <= 16:
    raise ValueError(f"max_bits must be in [9, 16]; got {max_bits}.")
  table, out = [bytes((i,)) for i in range(256)] + [b""], bytearray()
  n_bits, start, pos, total, prev = 9, 0, 0, 8 * len(data), None

  def group_end(pos, start, n_bits):
    span = 8 * n_bits
    return start + -(-(pos - start) // span) * span

  while True:
    if len(table) > (1 << n_bits) - 1 and n_bits < max_bits:
      pos = start = group_end(pos, start, n_bits)
      n_bits += 1
    if pos + n_bits > total:
      break
    byte = pos >> 3
    code = (int.from_bytes(data[byte:byte + 3], "little") >> (pos & 7)) & ((1 << n_bits) - 1)
    pos += n_bits
    if code == 256 and prev is not None:
      pos = start = group_end(pos, start, n_bits)
      del table[257:]
      n_bits, prev = 9, None
      continue
    if code < (256 if prev is None else len(table)):
      entry = table[code]
    elif code == len(table) and prev is not None:
      entry = prev + prev[:1]  # the code being defined by this very step
    else:
      raise ValueError(f"corrupt LZW stream: code {code} at bit {pos - n_bits} is past the "
                       f"{256 if prev is None else len(table)} codes defined so far.")
    if prev is not None and len(table) < (1 << max_bits):
      table.append(prev + entry[:1])
    out += entry
    prev = entry
  return bytes(out)


def read_bible_data(path: str | os.PathLike) -> Iterator[tuple[str, str]]:
  """Yields ``(chapter, text)`` from a bible-kjv ``bible.data`` file, one chapter at a time.

  The file (magic ``EC02``) holds the text as a ``compress`` stream with a checkpoint every
  ``window`` bytes: big-endian window size at byte 0x54, window count n at 0x58, then n + 1
  file offsets at 0x5C; each window decodes on its own. Lines are ``Ge1:1 In the ...``;
  the verse references are stripped and a chapter's verses are joined by newlines.
  """
  with open(path, "rb") as f:
    head = f.read(0x5C)
    if len(head) < 0x5C or head[:4] != b"EC02":
      raise ValueError(f"{path}: not a bible-kjv EC02 compressed data file (magic "
                       f"{head[:4]!r}, expected b'EC02').")
    window, n_windows = struct.unpack(">II", head[0x54:0x5C])
    offsets = struct.unpack(f">{n_windows + 1}I", f.read(4 * (n_windows + 1)))
    f.seek(offsets[0] - 3)
    magic = f.read(3)
    max_bits = magic[2] & 0x1F if magic[:2] == b"\x1f\x9d" else 16
    chapter, verses, tail = None, [], b""
    for i in range(n_windows):
      f.seek(offsets[i])
      text = tail + unlzw(f.read(offsets[i + 1] - offsets[i]), max_bits)[:window]
      lines = text.split(b"\n")
      tail = lines.pop() if i < n_windows - 1 else b""
      for line in lines:
        match = _VERSE.match(line.decode("latin-1"))
        if match is None:
          continue
        key = match.group(1) + match.group(2)
        if key != chapter and verses:
          yield chapter, "\n".join(verses)
          verses = []
        chapter = key
        verses.append(match.group(4))
    if verses:
      yield chapter, "\n".join(verses)


class _TextExtractor(html.parser.HTMLParser):
  """Collects visible text; keeps only the ``role="main"`` element when there is one."""

  _SKIP = frozenset({"script", "style", "head", "noscript", "template"})
  _BLOCK = frozenset(("p div br li ul ol dl dt dd h1 h2 h3 h4 h5 h6 pre tr table section "
                      "article header footer blockquote hr aside nav form").split())

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.all, self.main, self.found_main = [], [], False
    self._open, self._main_at, self._in_main = collections.Counter(), None, False

  def _emit(self, text):
    for buf in (self.all, self.main) if self._in_main else (self.all,):
      at_line_start = not buf or buf[-1].endswith("\n")
      piece = text.lstrip(" ") if at_line_start and not self._open["pre"] else text
      if piece:
        buf.append(piece)

  def handle_starttag(self, tag, attrs):
    self._open[tag] += 1
    if not self.found_main and ("role", "main") in attrs:
      self.found_main, self._in_main, self._main_at = True, True, (tag, self._open[tag])
    if tag in self._BLOCK:
      self._emit("\n")

  def handle_endtag(self, tag):
    if tag in self._BLOCK:
      self._emit("\n")
    if self._in_main and (tag, self._open[tag]) == self._main_at:
      self._in_main = False
    self._open[tag] = max(0, self._open[tag] - 1)

  def handle_data(self, data):
    if not any(self._open[tag] for tag in self._SKIP):
      self._emit(data if self._open["pre"] else re.sub(r"\s+", " ", data))


def html_to_text(markup: str) -> str:
  """Visible text of an HTML page (the ``role="main"`` part when present, else all of it)."""
  parser = _TextExtractor()
  parser.feed(markup)
  parser.close()
  text = "".join(parser.main if parser.found_main else parser.all).replace("\u00b6", "")
  text = "\n".join(line.rstrip() for line in text.split("\n"))
  return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def _open_text(path: pathlib.Path) -> io.TextIOBase:
  with open(path, "rb") as f:
    gzipped = f.read(2) == b"\x1f\x8b"
  raw = gzip.open(path, "rb") if gzipped else open(path, "rb")
  return io.TextIOWrapper(raw, encoding="utf-8", errors="replace")


def _base_suffix(path: pathlib.Path) -> str:
  name = path.name.lower()
  return pathlib.Path(name[:-3] if name.endswith(".gz") else name).suffix


def _fortune_texts(lines: Iterator[str]) -> Iterator[str]:
  fortune = []
  for line in itertools.chain(lines, ["%\n"]):
    if line.rstrip("\r\n") == "%":
      yield _OVERSTRIKE.sub("", "".join(fortune)).strip("\n")
      fortune = []
    else:
      fortune.append(line)


def _chunk_texts(f: io.TextIOBase, chunk_chars: int) -> Iterator[str]:
  part, size = [], 0
  while line := f.readline(chunk_chars):
    part.append(line)
    size += len(line)
    if size >= chunk_chars:
      yield "".join(part)
      part, size = [], 0
  yield "".join(part)


def _iter_file(source: _Source, path: pathlib.Path, chunk_chars: int
               ) -> Iterator[tuple[str, str]]:
  rel = path.name if source.root == path else path.relative_to(source.root).as_posix()
  name = f"{source.name}:{rel}"
  if source.kind == "bible":
    for chapter, text in read_bible_data(path):
      yield f"{source.name}:{chapter}", text
    return
  with _open_text(path) as f:
    if source.kind == "html" or _base_suffix(path) in (".html", ".htm"):
      texts = iter([html_to_text(f.read())])
    elif source.kind == "fortunes":
      texts = _fortune_texts(f)
    else:
      texts = _chunk_texts(f, chunk_chars)
    for i, text in enumerate(t for t in texts if t.strip()):
      yield name + (f":{i}" if source.kind == "fortunes" else f"#{i}" if i else ""), text


def _walk(root: pathlib.Path, keep) -> tuple[pathlib.Path, ...]:
  found = []
  for folder, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if keep(pathlib.Path(folder, d), True))
    found.extend(pathlib.Path(folder, n) for n in files if keep(pathlib.Path(folder, n), False))
  return tuple(sorted(found, key=lambda p: p.relative_to(root).as_posix()))


def _bible() -> _Source | None:
  found = [p for p in map(pathlib.Path, BIBLE_DATA_PATHS) if p.is_file()]
  return _Source("bible-kjv", "bible", found[0], (found[0],)) if found else None


def _fortunes() -> _Source | None:
  for root in (p for p in map(pathlib.Path, FORTUNE_DIRS) if p.is_dir()):
    # The .dat files are strfile indexes and the .u8 names are symlinks to the same text.
    files = tuple(sorted(p for p in root.iterdir() if p.is_file() and not p.is_symlink()
                         and p.suffix not in (".dat", ".u8")))
    if files:
      return _Source("fortunes", "fortunes", root, files)
  return None


def _python_doc() -> _Source | None:
  def keep(path, is_dir):
    if is_dir:  # _static, _sources, ... hold assets and duplicate sources
      return not path.name.startswith(("_", "."))
    return (_base_suffix(path) == ".html" and
            not path.name.startswith(("genindex", "search.", "py-modindex")))

  roots = [pathlib.Path(p) for root in PYTHON_DOC_ROOTS
           for p in glob.glob(os.path.join(root, "python3.*", "html"))]
  roots = [r for r in roots if re.fullmatch(r"python3\.\d+", r.parent.name)]
  for root in sorted(roots, key=lambda r: int(r.parent.name[8:]), reverse=True):
    files = _walk(root, keep)
    if files:
      return _Source(f"{root.parent.name}-doc", "html", root, files)
  return None


def _stdlib() -> _Source:
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  skip = ("site-packages", "dist-packages", "__pycache__")
  return _Source("python-stdlib", "text", root, _walk(
      root, lambda p, is_dir: p.name not in skip if is_dir else p.suffix == ".py"))


def _resolve(spec: CorpusSpec) -> tuple[list[_Source], list[str], bool]:
  """Sources in spec order, the missing Debian corpora, and whether it fell back."""
  sources, missing, fell_back = [], [], False
  finders = {"bible-kjv": (_bible, "bible-kjv"), "fortunes": (_fortunes, "fortunes"),
             "python-doc": (_python_doc, "python3.X-doc")}
  for entry in spec.sources:
    if entry == "default":
      found = [(package, finder()) for finder, package in finders.values()]
      missing += [package for package, src in found if src is None]
      found = [src for _, src in found if src is not None]
      if not found:
        fell_back = True
        found = [_stdlib()]
        warnings.warn(
            f"None of the Debian corpora is installed (missing: {', '.join(missing)}; "
            f"searched {BIBLE_DATA_PATHS}, {FORTUNE_DIRS}, {PYTHON_DOC_ROOTS}); falling "
            f"back to the CPython standard-library sources in {found[0].root}. To use "
            f"them, {INSTALL_HINT}.", MissingCorpusWarning, stacklevel=3)
      sources += found
    elif entry in finders:
      src = finders[entry][0]()
      if src is None:
        raise FileNotFoundError(f"corpus {entry!r} is not installed; {INSTALL_HINT}.")
      sources.append(src)
    elif entry == "python-stdlib":
      sources.append(_stdlib())
    elif os.path.isfile(entry):
      path = pathlib.Path(entry)
      sources.append(_Source(path.name, "text", path, (path,)))
    elif os.path.isdir(entry):
      root = pathlib.Path(entry)
      exts = tuple(e.lower() for e in spec.extensions)
      exts += tuple(e + ".gz" for e in exts)
      files = _walk(root, lambda p, is_dir: is_dir or p.name.lower().endswith(exts))
      sources.append(_Source(root.name or entry, "text", root, files))
    elif any(c in entry for c in "*?["):
      files = tuple(sorted({pathlib.Path(p) for p in glob.glob(entry, recursive=True)
                            if os.path.isfile(p)}))
      root = pathlib.Path(os.path.commonpath([p.parent for p in files]) if files else ".")
      sources.append(_Source(entry, "text", root, files))
    else:
      raise ValueError(f"corpus source {entry!r} is neither a built-in corpus {BUILTINS}, "
                       "an existing file or folder, nor a glob pattern.")
  return sources, missing, fell_back


def iter_documents(spec: SpecLike = None) -> Iterator[tuple[str, str]]:
  """Yields ``(source_name, text)`` documents in a deterministic order.

  Args:
    spec: see the module docstring; ``None`` means the default Debian corpora.

  Yields:
    ``source_name`` is ``"<source>:<relative path>"`` (``#k`` marks the k-th chunk of a
    long text file, ``:i`` the i-th fortune of a fortune file, ``bible-kjv:Ge1`` a
    chapter); ``text`` is never empty.
  """
  spec = as_spec(spec)
  sources, _, _ = _resolve(spec)
  for source in sources:
    for path in source.files:
      yield from _iter_file(source, path, spec.chunk_chars)


def describe(spec: SpecLike = None) -> dict:
  """Which sources ``spec`` resolves to, with their file counts and bytes on disk.

  Returns:
    ``{"sources": [{"name", "kind", "root", "files", "bytes"}], "missing": [Debian
    packages not found], "fallback": bool}``; nothing is decompressed or parsed.
  """
  sources, missing, fell_back = _resolve(as_spec(spec))
  rows = [{"name": s.name, "kind": s.kind, "root": str(s.root), "files": len(s.files),
           "bytes": sum(p.stat().st_size for p in s.files)} for s in sources]
  return {"sources": rows, "missing": missing, "fallback": fell_back}
