"""Tests for sae_jax.data.corpus: readers, spec resolution and the Debian fallback."""

import gzip
import os
import pathlib
import shutil
import struct
import tempfile
import warnings
from unittest import mock

import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from sae_jax.data import corpus


def _pack(codes_and_widths):
  """Packs (code, width) pairs LSB-first, as Unix compress does."""
  value, pos = 0, 0
  for code, width in codes_and_widths:
    value |= code << pos
    pos += width
  return value.to_bytes((pos + 7) // 8, "little")


def _compress(data: bytes, max_bits: int = 16, clear_after: int | None = None) -> bytes:
  """Reference compress-4.0 LZW encoder (block mode, no header) to feed the decoder."""
  out, pos, start, n_bits = [], 0, 0, 9

  def emit(code):
    nonlocal pos
    out.append((code, n_bits, pos))
    pos += n_bits

  def align():
    nonlocal pos, start
    span = 8 * n_bits
    pos = start = start + -(-(pos - start) // span) * span

  table, next_code, w, emitted = {bytes([i]): i for i in range(256)}, 257, b"", 0
  for ch in data:
    wc = w + bytes([ch])
    if wc in table:
      w = wc
      continue
    emit(table[w])
    emitted += 1
    if next_code > (1 << n_bits) - 1 and n_bits < max_bits:
      align()
      n_bits += 1
    if next_code < (1 << max_bits):
      table[wc], next_code = next_code, next_code + 1
    w = bytes([ch])
    if clear_after and emitted % clear_after == 0:
      emit(256)
      align()
      n_bits, next_code = 9, 257
      table = {bytes([i]): i for i in range(256)}
  emit(table[w])
  value = 0
  for code, _, at in out:
    value |= code << at
  return value.to_bytes((pos + 7) // 8, "little")


def _ec02(path: pathlib.Path, text: bytes, window: int) -> None:
  """Writes ``text`` in bible-kjv's windowed format: header, offsets, one stream per window."""
  windows = [text[i:i + window] for i in range(0, len(text), window)]
  streams = [_compress(w) for w in windows]
  first = 0x5C + 4 * (len(windows) + 1) + 3
  offsets = np.cumsum([first] + [len(s) for s in streams]).tolist()
  head = b"EC02Compressed Data File".ljust(0x54, b"\0")
  head += struct.pack(">II", window, len(windows)) + struct.pack(f">{len(offsets)}I", *offsets)
  path.write_bytes(head + b"\x1f\x9d\x90" + b"".join(streams))


def _text(n: int, seed: int = 0) -> bytes:
  rng = np.random.default_rng(seed)
  words = [b"the", b"lord", b"said", b"unto", b"moses", b"and", b"it", b"was", b"so", b"\n"]
  return b" ".join(words[i] for i in rng.integers(0, len(words), n))


class LzwTest(parameterized.TestCase):

  def test_golden_codes_with_kwkwk(self):
    # By hand: A, B, then 257 = "AB" (defined after B), then 259 is the code being defined
    # ("AB" + "A"), so the output is A B AB ABA.
    data = _pack([(65, 9), (66, 9), (257, 9), (259, 9)])
    self.assertEqual(corpus.unlzw(data), b"ABABABA")

  @parameterized.parameters((16, None), (12, None), (16, 700), (9, None))
  def test_round_trip_through_width_changes_clears_and_full_tables(self, max_bits, clear):
    data = _text(6000, seed=max_bits)
    packed = _compress(data, max_bits, clear)
    self.assertEqual(corpus.unlzw(packed, max_bits), data)

  def test_corrupt_stream_and_bad_max_bits_raise(self):
    with self.assertRaisesRegex(ValueError, "code 300 at bit 9"):
      corpus.unlzw(_pack([(65, 9), (300, 9)]))
    with self.assertRaisesRegex(ValueError, "max_bits must be in \\[9, 16\\]; got 8"):
      corpus.unlzw(b"", max_bits=8)


class ReadersTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.root = pathlib.Path(tempfile.mkdtemp())
    self.addCleanup(shutil.rmtree, self.root)

  def test_bible_data_chapters_across_windows(self):
    text = (b"Holy Bible header line.\nGe1:1 In the beginning.\nGe1:2 And the earth.\n"
            b"Ge2:1 Thus the heavens.\n1Sa1:1 Now there was a man.\n")
    _ec02(self.root / "bible.data", text, window=20)  # verses straddle the 20-byte windows
    self.assertEqual(list(corpus.read_bible_data(self.root / "bible.data")), [
        ("Ge1", "In the beginning.\nAnd the earth."), ("Ge2", "Thus the heavens."),
        ("1Sa1", "Now there was a man.")])

  def test_bible_data_bad_magic_names_file(self):
    (self.root / "bad.data").write_bytes(b"XXXX" + bytes(200))
    with self.assertRaisesRegex(ValueError, "bad.data: not a bible-kjv EC02"):
      list(corpus.read_bible_data(self.root / "bad.data"))

  def test_html_to_text_golden(self):
    markup = ("<html><head><title>T</title><style>p{}</style></head><body><nav>menu</nav>"
              "<div role='main'><h1>Title<a>\u00b6</a></h1><p>One   two\n three &amp; "
              "<b>four</b></p><script>var x;</script><div><p>Inner</p></div>"
              "<pre>  a\n    b</pre></div><div>footer</div></body></html>")
    # Only the role=main div survives; runs of whitespace collapse outside <pre>.
    self.assertEqual(corpus.html_to_text(markup),
                     "Title\n\nOne two three & four\n\nInner\n\n  a\n    b")

  def test_html_without_main_keeps_body_but_not_scripts(self):
    text = corpus.html_to_text("<p>a</p><script>no</script><style>no</style><p>b</p>")
    self.assertEqual(text, "a\n\nb")

  def test_folder_is_recursive_sorted_and_reads_gzip(self):
    (self.root / "b").mkdir()
    (self.root / "a.txt").write_text("alpha\n")
    (self.root / "b" / "z.txt").write_text("zeta\n")
    (self.root / "b" / "c.md").write_text("ignored\n")
    with gzip.open(self.root / "b" / "y.txt.gz", "wt") as f:
      f.write("upsilon\n")
    name = self.root.name
    self.assertEqual(list(corpus.iter_documents(str(self.root))), [
        (f"{name}:a.txt", "alpha\n"), (f"{name}:b/y.txt.gz", "upsilon\n"),
        (f"{name}:b/z.txt", "zeta\n")])

  def test_extensions_select_html_and_python(self):
    (self.root / "page.html").write_text("<p>Hello <i>web</i></p>")
    (self.root / "mod.py").write_text("x = 1\n")
    (self.root / "notes.txt").write_text("skipped\n")
    spec = corpus.CorpusSpec(sources=(str(self.root),), extensions=(".html", ".py"))
    self.assertEqual([t for _, t in corpus.iter_documents(spec)], ["x = 1\n", "Hello web"])

  def test_glob_reads_every_match_whatever_its_extension(self):
    (self.root / "d").mkdir()
    (self.root / "d" / "x.rst").write_text("rst text\n")
    (self.root / "y.rst").write_text("more\n")
    docs = list(corpus.iter_documents(os.path.join(self.root, "**", "*.rst")))
    self.assertEqual([t for _, t in docs], ["rst text\n", "more\n"])

  def test_long_text_is_chunked_at_line_boundaries(self):
    lines = [f"line {i:04d}\n" for i in range(10)]  # 10 characters each
    (self.root / "big.txt").write_text("".join(lines))
    spec = corpus.CorpusSpec(sources=(str(self.root / "big.txt"),), chunk_chars=25)
    docs = list(corpus.iter_documents(spec))
    # 3 lines reach 30 >= 25 characters, so 10 lines make chunks of 3, 3, 3 and 1.
    self.assertEqual([n for n, _ in docs], ["big.txt:big.txt", "big.txt:big.txt#1",
                                            "big.txt:big.txt#2", "big.txt:big.txt#3"])
    self.assertEqual("".join(t for _, t in docs), "".join(lines))

  def test_fortunes_split_strip_overstrike_and_skip_indexes(self):
    (self.root / "jokes").write_text("First\n%\n__\x08bold b\x08bb\n%\n%\n\nLast line\n")
    (self.root / "jokes.dat").write_bytes(b"\x00\x01")
    os.symlink(self.root / "jokes", self.root / "jokes.u8")
    with mock.patch.object(corpus, "FORTUNE_DIRS", (str(self.root),)):
      docs = list(corpus.iter_documents("fortunes"))
    self.assertEqual(docs, [("fortunes:jokes:0", "First"), ("fortunes:jokes:1", "bold bb"),
                            ("fortunes:jokes:2", "Last line")])


class SpecTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.root = pathlib.Path(tempfile.mkdtemp())
    self.addCleanup(shutil.rmtree, self.root)
    self.missing = str(self.root / "missing")

  def _patch(self, bible=(), fortunes=(), docs=()):
    return mock.patch.multiple(corpus, BIBLE_DATA_PATHS=bible, FORTUNE_DIRS=fortunes,
                               PYTHON_DOC_ROOTS=docs)

  def test_fallback_to_stdlib_warns_with_install_hint(self):
    with self._patch((self.missing,), (self.missing,), (self.missing,)):
      with self.assertWarns(corpus.MissingCorpusWarning) as caught:
        info = corpus.describe()
      with warnings.catch_warnings():
        warnings.simplefilter("ignore", corpus.MissingCorpusWarning)
        name, text = next(corpus.iter_documents())
    message = str(caught.warning)
    self.assertIn("apt-get install bible-kjv fortunes python3.11-doc", message)
    self.assertIn("--text PATH", message)
    self.assertTrue(info["fallback"])
    self.assertEqual(info["missing"], ["bible-kjv", "fortunes", "python3.X-doc"])
    self.assertEqual([s["name"] for s in info["sources"]], ["python-stdlib"])
    self.assertGreater(info["sources"][0]["files"], 100)
    self.assertTrue(name.startswith("python-stdlib:") and name.endswith(".py"))
    self.assertTrue(text.strip())

  def test_default_uses_installed_corpora_in_order_without_warning(self):
    _ec02(self.root / "bible.data", b"Ge1:1 In the beginning.\n", window=64)
    (self.root / "fortunes").mkdir()
    (self.root / "fortunes" / "f").write_text("Fortune.\n")
    for version in ("3.9", "3.12"):  # the newest documentation wins
      html = self.root / "doc" / f"python{version}" / "html"
      (html / "_static").mkdir(parents=True)
      (html / "_static" / "x.html").write_text("<p>asset</p>")
      (html / "genindex-A.html").write_text("<p>index</p>")
      (html / "page.html").write_text(f"<p>Python {version}</p>")
    with self._patch((str(self.root / "bible.data"),), (str(self.root / "fortunes"),),
                     (str(self.root / "doc"),)):
      with warnings.catch_warnings():
        warnings.simplefilter("error", corpus.MissingCorpusWarning)
        docs = list(corpus.iter_documents(None))
        info = corpus.describe("default")
    self.assertEqual(docs, [("bible-kjv:Ge1", "In the beginning."), ("fortunes:f:0", "Fortune."),
                            ("python3.12-doc:page.html", "Python 3.12")])
    self.assertEqual([s["name"] for s in info["sources"]],
                     ["bible-kjv", "fortunes", "python3.12-doc"])
    self.assertEqual(info["sources"][0]["bytes"], (self.root / "bible.data").stat().st_size)
    self.assertEqual((info["missing"], info["fallback"]), ([], False))

  def test_iteration_is_deterministic(self):
    for i in (3, 1, 2):
      (self.root / f"{i}.txt").write_text(f"doc {i}\n")
    first = list(corpus.iter_documents([str(self.root)]))
    self.assertEqual(first, list(corpus.iter_documents(corpus.as_spec(str(self.root)))))
    self.assertEqual([t for _, t in first], ["doc 1\n", "doc 2\n", "doc 3\n"])

  def test_bad_specs_raise(self):
    with self.assertRaisesRegex(ValueError, "'nowhere' is neither a built-in corpus"):
      list(corpus.iter_documents("nowhere"))
    with self.assertRaisesRegex(ValueError, "sources must name at least one corpus"):
      corpus.CorpusSpec(sources=())
    with self.assertRaisesRegex(ValueError, "extensions must start with '.'; got \\('txt',\\)"):
      corpus.CorpusSpec(extensions=("txt",))
    with self.assertRaisesRegex(ValueError, "chunk_chars must be >= 1; got 0"):
      corpus.CorpusSpec(chunk_chars=0)
    with self._patch():
      with self.assertRaisesRegex(FileNotFoundError, "'bible-kjv' is not installed.*apt-get"):
        corpus.describe("bible-kjv")


@absltest.skipUnless(all(os.path.exists(p) for p in ("/usr/lib/bible.data",
                                                       "/usr/share/games/fortunes")),
                     "the Debian bible-kjv and fortunes packages are not installed")
class RealDebianCorporaTest(absltest.TestCase):

  def test_bible_has_every_chapter_and_verse(self):
    chapters = list(corpus.read_bible_data("/usr/lib/bible.data"))
    # The King James Bible has 1,189 chapters and 31,102 verses.
    self.assertLen(chapters, 1189)
    self.assertEqual(sum(t.count("\n") + 1 for _, t in chapters), 31102)
    self.assertEqual(chapters[0][0], "Ge1")
    self.assertTrue(chapters[0][1].startswith("In the beginning God created the heaven"))
    self.assertTrue(chapters[-1][1].endswith("be with you all. Amen."))

  def test_default_spec_streams_all_three_sources(self):
    info = corpus.describe()
    names = [s["name"] for s in info["sources"]]
    self.assertEqual(names[:2], ["bible-kjv", "fortunes"])
    fortunes = [d for d in corpus.iter_documents("fortunes")]
    self.assertGreater(len(fortunes), 1000)
    self.assertTrue(all(t.strip() and "\x08" not in t for _, t in fortunes))
    if len(names) == 3:
      self.assertGreater(info["sources"][2]["files"], 400)
      name, _ = next(corpus.iter_documents("python-doc"))
      self.assertRegex(name, r"^python3\.\d+-doc:")
      pages = os.path.join(info["sources"][2]["root"], "library", "json.html")
      (_, json_page), = corpus.iter_documents(pages)
      self.assertIn("JSON (JavaScript Object Notation)", json_page)
      self.assertNotIn("<span", json_page)
      self.assertNotIn("Navigation", json_page)


if __name__ == "__main__":
  absltest.main()
