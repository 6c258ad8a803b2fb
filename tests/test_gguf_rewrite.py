"""The in-place GGUF rewriter (convert/io/gguf_rewrite.py): keys set and dropped, rope factor tensors added or
replaced, every other byte copied as it is, checked through gguf-py's GGUFReader and llama.cpp (llama-cpp-python),
and bad inputs and interrupted writes leave nothing behind."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

from convert.errors import ConvertError
from convert.io import gguf_meta, gguf_rewrite
from convert.io.gguf_meta import read_gguf, read_layout
from convert.io.gguf_rewrite import rewrite_gguf
from tiny import ORIGINAL

ROOT = Path(__file__).resolve().parents[1]
TARGET = 4 * ORIGINAL
TOKENS = [f"tok{i}" if i % 7 else f"▁wörd {i}" for i in range(128)]


def _synthetic(path: Path, alignment: int | None = None, rope: np.ndarray | None = None, vocab: list[str] = TOKENS,
               merges: int = 0) -> Path:
    """A GGUF written by gguf-py's GGUFWriter: scalars of several types, a string array of ``len(vocab)`` entries,
    numeric arrays, and tensors F32, F16 (an odd size, so padding follows it), Q8_0 and I32; ``rope`` puts an F32
    ``rope_freqs.weight`` between them."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_name("synthetic")
    w.add_context_length(ORIGINAL)
    w.add_rope_freq_base(10000.0)
    w.add_head_count(4)
    w.add_key_value("test.flag", True, VT.BOOL)
    w.add_key_value("test.i64", -(1 << 40), VT.INT64)
    w.add_key_value("test.f64", 0.1, VT.FLOAT64)
    w.add_key_value("test.u8", 7, VT.UINT8)
    w.add_token_list(vocab)
    w.add_token_scores(rng.standard_normal(len(vocab)).astype(np.float32).tolist())
    w.add_token_types([1] * len(vocab))
    if merges:
        w.add_token_merges([f"t{i} k{i}" for i in range(merges)])
    w.add_array("test.ints", [3, 1, 4, 1, 5])
    # 68 kB: the data section is one run longer than gguf_rewrite.INLINE_BELOW, so the kernel copies it
    embd = gguf.quants.quantize(rng.standard_normal((64, 1024)).astype(np.float32), QT.Q8_0)
    w.add_tensor("token_embd.weight", embd, raw_dtype=QT.Q8_0)
    if rope is not None:
        w.add_tensor("rope_freqs.weight", rope)
    w.add_tensor("blk.0.attn_q.weight", rng.standard_normal((3, 5)).astype(np.float16))
    w.add_tensor("blk.0.ids", np.arange(6, dtype=np.int32))
    w.add_tensor("output_norm.weight", rng.standard_normal(64).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _packed(path: Path) -> None:
    """llama.cpp's rule (ggml/src/gguf.cpp): each tensor's offset is the running sum of the padded sizes before it."""
    lay = read_layout(path)
    at = 0
    for t in lay.tensors:
        assert t.offset == at, t.name
        at += t.n_bytes + (-t.n_bytes % lay.alignment)
    assert lay.data_start % lay.alignment == 0 and lay.size == lay.data_start + at


def _check(src: Path, dst: Path, set_kv: dict, drop: tuple = (), set_tensors: dict | None = None) -> None:
    """dst is src with exactly these changes, read back through gguf-py's GGUFReader."""
    set_tensors = set_tensors or {}
    r0, r1 = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(dst))
    for key, f in r0.fields.items():
        if key.startswith("GGUF.") or key in set_kv:
            continue
        if key in drop:
            assert key not in r1.fields, key
            continue
        g = r1.fields[key]
        assert g.types == f.types and g.contents() == f.contents(), key
    for key, (value, vtype) in set_kv.items():
        g = r1.fields[key]
        assert g.types[0] == vtype
        got = g.contents()
        assert (got == pytest.approx(value) if isinstance(value, float) else
                list(got) == list(value) if vtype == VT.ARRAY else got == value), key
    n_new = len(set(set_tensors) - {t.name for t in r0.tensors})
    assert r1.fields["GGUF.tensor_count"].contents() == len(r0.tensors) + n_new
    out = {t.name: t for t in r1.tensors}
    assert [t.name for t in r1.tensors][: len(r0.tensors)] == [t.name for t in r0.tensors]
    for t in r0.tensors:
        if t.name in set_tensors:
            continue
        o = out[t.name]
        assert o.tensor_type == t.tensor_type and list(o.shape) == list(t.shape), t.name
        assert o.data.tobytes() == t.data.tobytes(), t.name
    for name, data in set_tensors.items():
        arr = data[0] if isinstance(data, tuple) else data
        assert out[name].data.tobytes() == np.ascontiguousarray(arr).tobytes(), name
    lay0, lay1 = read_layout(src), read_layout(dst)
    assert (lay1.version, lay1.alignment) == (lay0.version, lay0.alignment)
    _packed(dst)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "partial" in p.name or p.name.startswith("."))


# ------------------------------------------------------------------------------------------- synthetic GGUFs
@pytest.mark.parametrize("alignment", [None, 64, 256])
def test_adds_rope_freqs_sets_and_drops_keys_and_copies_the_rest(tmp_path, alignment):
    src = _synthetic(tmp_path / "src.gguf", alignment)
    factors = np.linspace(1, 4, 8, dtype=np.float32)
    set_kv = {"llama.context_length": (TARGET, VT.UINT32), "llama.rope.freq_base": (50000.0, VT.FLOAT32),
              "llama.rope.scaling.original_context_length": (ORIGINAL, VT.UINT32),
              "test.names": (["a", "b", "c"], VT.ARRAY), "test.u32s": (np.array([1, 2], np.uint32), VT.ARRAY)}
    dst = tmp_path / "dst.gguf"
    s = rewrite_gguf(src, dst, set_kv=set_kv, drop_kv=["general.name", "not.there"],
                     set_tensors={"rope_freqs.weight": factors}, progress=False)
    _check(src, dst, set_kv, ("general.name",), {"rope_freqs.weight": factors})
    r1 = gguf.GGUFReader(str(dst))
    assert r1.fields["test.u32s"].types == [VT.ARRAY, VT.UINT32]
    assert r1.fields["test.names"].types == [VT.ARRAY, VT.STRING]
    assert r1.tensors[-1].name == "rope_freqs.weight" and r1.tensors[-1].tensor_type == QT.F32
    # appended after the others: the unchanged tensors keep their offsets in the data section
    assert [t.offset for t in read_layout(dst).tensors[:-1]] == [t.offset for t in read_layout(src).tensors]
    assert s["tensors_added"] == ["rope_freqs.weight"] and s["tensors_replaced"] == [] and s["tensors_kept"] == 4
    assert s["keys_dropped"] == ["general.name"] and s["keys_set"] == list(set_kv)
    assert s["keys_added"] == ["llama.rope.scaling.original_context_length", "test.names", "test.u32s"]
    assert s["bytes_written"] == dst.stat().st_size and s["bytes_copied"] > 0.9 * src.stat().st_size
    assert _leftovers(tmp_path) == []
    # the lean reader reads the result, and untouched key order is kept (set keys in place, new ones at the end)
    keys0 = [k.key for k in read_layout(src).kvs if k.key != "general.name"]
    assert [k.key for k in read_layout(dst).kvs] == keys0 + s["keys_added"]
    assert read_gguf(dst).meta["llama.context_length"] == TARGET


@pytest.mark.parametrize("new_len", [8, 6, 32])
def test_replaces_an_existing_rope_freqs_in_the_middle(tmp_path, new_len):
    """Same padded size: written in place, nothing moves; another size: the tensors after it move, still packed."""
    src = _synthetic(tmp_path / "src.gguf", rope=np.ones(8, np.float32))
    new = np.arange(1, new_len + 1, dtype=np.float32)
    dst = tmp_path / "dst.gguf"
    s = rewrite_gguf(src, dst, set_kv={"llama.context_length": (TARGET, VT.UINT32)},
                     set_tensors={"rope_freqs.weight": new}, progress=False)
    _check(src, dst, {"llama.context_length": (TARGET, VT.UINT32)}, (), {"rope_freqs.weight": new})
    assert s["tensors_replaced"] == ["rope_freqs.weight"] and s["tensors_added"] == []
    names = [t.name for t in read_layout(dst).tensors]
    assert names == [t.name for t in read_layout(src).tensors]  # it keeps its place in the table
    same = [t.offset for t in read_layout(dst).tensors] == [t.offset for t in read_layout(src).tensors]
    assert same == (new_len in (6, 8))  # 24 and 32 bytes both pad to 32


def test_tensor_type_and_quantised_replacements(tmp_path):
    src = _synthetic(tmp_path / "src.gguf", rope=np.ones(8, np.float32))
    rng = np.random.default_rng(1)
    q = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), QT.Q8_0)
    new = {"rope_freqs.weight": np.full(8, 2, np.float16), "blk.1.q": (q, QT.Q8_0),
           "blk.1.w": rng.standard_normal((2, 3, 4)).astype(np.float32)}
    dst = tmp_path / "dst.gguf"
    rewrite_gguf(src, dst, set_tensors=new, progress=False)
    _check(src, dst, {}, (), new)
    out = {t.name: t for t in gguf.GGUFReader(str(dst)).tensors}
    assert out["rope_freqs.weight"].tensor_type == QT.F16
    assert out["blk.1.q"].tensor_type == QT.Q8_0 and list(out["blk.1.q"].shape) == [64, 4]
    assert list(out["blk.1.w"].shape) == [4, 3, 2]  # GGUF order: fastest dimension first
    np.testing.assert_array_equal(gguf.quants.dequantize(out["blk.1.q"].data, QT.Q8_0),
                                  gguf.quants.dequantize(q, QT.Q8_0))


def test_layout_spans_agree_with_gguf_py(tmp_path):
    src = _synthetic(tmp_path / "src.gguf", 64, rope=np.ones(8, np.float32))
    lay, ref = read_layout(src), gguf.GGUFReader(str(src))
    fields = [f for k, f in ref.fields.items() if not k.startswith("GGUF.")]
    assert [kv.key for kv in lay.kvs] == [f.name for f in fields]
    for kv, f, nxt in zip(lay.kvs, fields, [k.start for k in lay.kvs[1:]] + [lay.tensors[0].start]):
        assert kv.start == f.offset and kv.end == nxt, kv.key
        assert (kv.vtype == VT.ARRAY and kv.value is None and kv.count == len(f.data)) or kv.value == f.contents()
    for t, r, nxt in zip(lay.tensors, ref.tensors, [t.start for t in lay.tensors[1:]] + [lay.header_end]):
        assert t.start == r.field.offset and t.end == nxt and lay.data_start + t.offset == r.data_offset
        assert t.n_bytes == r.n_bytes
    assert lay.alignment == 64 and lay.data_start % 64 == 0


@pytest.mark.parametrize("case", ["add", "replace-longer", "replace-same", "types", "nothing"])
def test_the_remembered_output_walk_is_the_files_own(tmp_path, case):
    """The rewrite records the output's header as it planned it (so a command's summary does not walk a 262k-token
    vocabulary again); that record must equal a fresh walk of the written file, entry for entry and byte for byte."""
    src = _synthetic(tmp_path / "src.gguf", 64 if case == "types" else None,
                     rope=None if case == "add" else np.ones(8, np.float32))
    kw = {"add": dict(set_kv={"llama.context_length": (TARGET, VT.UINT32), "test.names": (["a", "é"], VT.ARRAY),
                              "llama.rope.scaling.factor": (4.1325474, VT.FLOAT32)},
                      drop_kv=["general.name"], set_tensors={"rope_freqs.weight": np.linspace(1, 4, 8, dtype=np.float32)}),
          "replace-longer": dict(set_kv={"llama.context_length": (TARGET, VT.UINT64)},
                                 set_tensors={"rope_freqs.weight": np.ones(40, np.float32)}),
          "replace-same": dict(set_kv={"general.name": ("a longer name than before", VT.STRING)},
                               set_tensors={"rope_freqs.weight": np.full(8, 2, np.float32)}),
          "types": dict(set_kv={"test.u32s": (np.array([1, 2], np.uint32), VT.ARRAY), "test.flag": (False, VT.BOOL)},
                        set_tensors={"blk.1.w": np.zeros((2, 3), np.float16)}),
          "nothing": dict()}[case]
    dst = tmp_path / "dst.gguf"
    rewrite_gguf(src, dst, progress=False, **kw)
    key = gguf_meta._file_key(dst)
    remembered = gguf_meta._WALKS[key]
    gguf_meta._WALKS.pop(key)
    fresh = gguf_meta._walked(dst)[1]
    assert gguf_meta._WALKS[key] is fresh and fresh is not remembered
    assert remembered == fresh


def test_values_are_strictly_typed(tmp_path):
    src = _synthetic(tmp_path / "src.gguf")
    dst = tmp_path / "dst.gguf"
    for value, vtype, words in ((-1, VT.UINT32, "does not fit UINT32"), (1 << 32, VT.UINT32, "does not fit"),
                                (1.5, VT.UINT32, "not an integer"), (True, VT.INT32, "not an integer"),
                                ("x", VT.FLOAT32, "not a number"), (1, VT.BOOL, "not a BOOL"),
                                (3, VT.STRING, "not a STRING"), ([1, "a"], VT.ARRAY, "mixes"),
                                (np.zeros((2, 2)), VT.ARRAY, "one-dimensional"), (300, VT.UINT8, "fit UINT8")):
        with pytest.raises(ConvertError, match=words):
            rewrite_gguf(src, dst, set_kv={"llama.context_length": (value, vtype)}, progress=False)
    with pytest.raises(ConvertError, match="value, gguf.GGUFValueType"):
        rewrite_gguf(src, dst, set_kv={"llama.context_length": 256}, progress=False)
    with pytest.raises(ConvertError, match="general.alignment cannot be changed"):
        rewrite_gguf(src, dst, set_kv={"general.alignment": (64, VT.UINT32)}, progress=False)
    with pytest.raises(ConvertError, match="both set and dropped"):
        rewrite_gguf(src, dst, set_kv={"a.b": (1, VT.UINT32)}, drop_kv=["a.b"], progress=False)
    with pytest.raises(ConvertError, match="no GGML type"):
        rewrite_gguf(src, dst, set_tensors={"x": np.array(["a"])}, progress=False)
    with pytest.raises(ConvertError, match="GGML_MAX_NAME"):
        rewrite_gguf(src, dst, set_tensors={"x" * 64: np.ones(2, np.float32)}, progress=False)
    assert not dst.exists() and _leftovers(tmp_path) == []
    # each type as given: the same number as UINT64, INT32 and FLOAT64
    kv = {"a.u64": (5, VT.UINT64), "a.i32": (-5, VT.INT32), "a.f64": (5, VT.FLOAT64), "a.b": (False, VT.BOOL)}
    rewrite_gguf(src, dst, set_kv=kv, progress=False)
    f = gguf.GGUFReader(str(dst)).fields
    assert [f[k].types[0] for k in kv] == [VT.UINT64, VT.INT32, VT.FLOAT64, VT.BOOL]
    assert [f[k].contents() for k in kv] == [5, -5, 5.0, False]


# ------------------------------------------------------------------------------------------- bad input, no leftovers
def _damaged(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    src = _synthetic(tmp_path / "good.gguf")
    raw = src.read_bytes()
    lay = read_layout(src)
    cases = {
        "missing": (b"", "does not exist"),
        "text": (b"not a model at all, just text" * 10, "not a GGUF"),
        "empty": (b"", "not a readable GGUF"),
        "head": (raw[: lay.kvs[-1].end - 3], "truncated"),  # cut inside the last metadata value
        "table": (raw[: lay.tensors[-1].end - 4], "truncated"),  # cut inside the tensor table
        "body": (raw[:-10], "ends inside tensor output_norm.weight.*truncated"),
        "v1": (raw[:4] + (1).to_bytes(4, "little") + raw[8:], "GGUF v1"),
        "v4": (raw[:4] + (4).to_bytes(4, "little") + raw[8:], "GGUF version 4.*v2 to v3"),
        "big-endian": (raw[:4] + (3).to_bytes(4, "big") + raw[8:], "big-endian GGUF v3"),
    }
    out = {}
    for name, (data, words) in cases.items():
        p = tmp_path / f"{name}.gguf"
        if name != "missing":
            p.write_bytes(data)
        out[name] = (p, words)
    return out


def test_bad_sources_are_refused_naming_the_problem_and_nothing_is_left(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name, (p, words) in _damaged(tmp_path).items():
        with pytest.raises(ConvertError, match=words) as e:
            rewrite_gguf(p, out / f"{name}.gguf", set_tensors={"rope_freqs.weight": np.ones(8, np.float32)},
                         progress=False)
        assert str(p) in str(e.value), name
        assert list(out.iterdir()) == [], name
    with pytest.raises(ConvertError, match="is a directory"):
        rewrite_gguf(tmp_path, out / "x.gguf", progress=False)


def test_existing_output_and_the_source_itself_are_refused(tmp_path):
    src = _synthetic(tmp_path / "src.gguf")
    before = src.read_bytes()
    kv = {"llama.context_length": (TARGET, VT.UINT32)}
    for same in (src, tmp_path / "sub" / ".." / "src.gguf", tmp_path / "link.gguf"):
        if same.name == "link.gguf":
            os.link(src, same)  # a hard link: another name for the same file
        (tmp_path / "sub").mkdir(exist_ok=True)
        with pytest.raises(ConvertError, match="is the source file"):
            rewrite_gguf(src, same, set_kv=kv, force=True, progress=False)
    assert src.read_bytes() == before
    dst = tmp_path / "dst.gguf"
    dst.write_bytes(b"keep me")
    with pytest.raises(ConvertError, match="already exists.*force"):
        rewrite_gguf(src, dst, set_kv=kv, progress=False)
    assert dst.read_bytes() == b"keep me"
    rewrite_gguf(src, dst, set_kv=kv, force=True, progress=False)
    assert gguf.GGUFReader(str(dst)).fields["llama.context_length"].contents() == TARGET
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("failure", [OSError(errno.EIO, "Input/output error"), KeyboardInterrupt()])
def test_an_interrupted_write_leaves_no_file(tmp_path, monkeypatch, failure):
    src = _synthetic(tmp_path / "src.gguf")
    real = gguf_rewrite._copy_range
    calls = []

    def flaky(src_fd, dst_fd, offset, length, state):
        calls.append(length)
        if length > 60_000:  # the header's ranges went through; fail half-way through the data section
            real(src_fd, dst_fd, offset, length // 2, state)
            raise failure
        real(src_fd, dst_fd, offset, length, state)

    monkeypatch.setattr(gguf_rewrite, "_copy_range", flaky)
    monkeypatch.setattr(gguf_rewrite, "INLINE_BELOW", 0)  # every source range through the copy, header ones too
    dst = tmp_path / "dst.gguf"
    kv = {"llama.context_length": (TARGET, VT.UINT32)}
    expect = (ConvertError, "failed.*nothing was left") if isinstance(failure, OSError) else (KeyboardInterrupt, None)
    with pytest.raises(expect[0], match=expect[1]):
        rewrite_gguf(src, dst, set_kv=kv, set_tensors={"rope_freqs.weight": np.ones(8, np.float32)}, progress=False)
    assert len(calls) > 3 and calls[-1] > 60_000 and not dst.exists() and _leftovers(tmp_path) == []
    # with force over an existing output: the old file stays whole
    dst.write_bytes(b"old")
    calls.clear()
    with pytest.raises(expect[0]):
        rewrite_gguf(src, dst, set_kv=kv, force=True, progress=False)
    assert dst.read_bytes() == b"old" and _leftovers(tmp_path) == []


def test_a_full_disk_is_one_clear_error(tmp_path, monkeypatch):
    src = _synthetic(tmp_path / "src.gguf")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(gguf_rewrite, "_copy_range", full)
    with pytest.raises(ConvertError, match="no space left in .* dst.gguf.*needs about"):
        rewrite_gguf(src, tmp_path / "dst.gguf", progress=False)
    assert _leftovers(tmp_path) == [] and not (tmp_path / "dst.gguf").exists()


@pytest.mark.skipif(not hasattr(os, "copy_file_range"), reason="os.copy_file_range is Linux-only")
def test_kept_tensors_are_copied_in_runs(tmp_path, monkeypatch):
    """Kept tensors are copied in runs: one copy_file_range for the 68 kB of tensors before the replaced
    rope_freqs; the run after it and the header's entries are shorter than INLINE_BELOW and are read inline."""
    src = _synthetic(tmp_path / "src.gguf", rope=np.ones(8, np.float32))
    real, calls = os.copy_file_range, []

    def spy(src_fd, dst_fd, count, offset_src=None, offset_dst=None):
        calls.append(count)
        return real(src_fd, dst_fd, count, offset_src, offset_dst)

    monkeypatch.setattr(os, "copy_file_range", spy)
    dst = tmp_path / "dst.gguf"
    s = rewrite_gguf(src, dst, set_kv={"llama.context_length": (TARGET, VT.UINT32)},
                     set_tensors={"rope_freqs.weight": np.full(8, 2, np.float32), "x": np.ones(3, np.float32)},
                     progress=False)
    lay = read_layout(src)
    assert [t.name for t in lay.tensors[:2]] == ["token_embd.weight", "rope_freqs.weight"]
    assert calls == [lay.tensors[0].n_bytes]  # 69632, a multiple of the alignment
    kept = sum(t.n_bytes + (-t.n_bytes % 32) for t in lay.tensors if t.name != "rope_freqs.weight")
    assert s["bytes_copied"] > kept and s["bytes_written"] - s["bytes_copied"] < 1000
    _check(src, dst, {"llama.context_length": (TARGET, VT.UINT32)}, (),
           {"rope_freqs.weight": np.full(8, 2, np.float32), "x": np.ones(3, np.float32)})


def test_copies_through_a_bounded_buffer_where_copy_file_range_is_refused(tmp_path, monkeypatch):
    src = _synthetic(tmp_path / "src.gguf", rope=np.ones(8, np.float32))
    kw = dict(set_kv={"llama.context_length": (TARGET, VT.UINT32)},
              set_tensors={"rope_freqs.weight": np.arange(16, dtype=np.float32)}, progress=False)
    rewrite_gguf(src, tmp_path / "fast.gguf", **kw)
    monkeypatch.setattr(gguf_rewrite, "INLINE_BELOW", 0)
    rewrite_gguf(src, tmp_path / "all-ranges.gguf", **kw)

    def refused(*a, **k):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(gguf_rewrite, "CHUNK", 100)  # many short reads
    monkeypatch.setattr(os, "copy_file_range", refused, raising=False)
    rewrite_gguf(src, tmp_path / "slow.gguf", **kw)
    monkeypatch.delattr(os, "copy_file_range")  # platforms without it
    rewrite_gguf(src, tmp_path / "none.gguf", **kw)
    fast = (tmp_path / "fast.gguf").read_bytes()
    assert (tmp_path / "slow.gguf").read_bytes() == fast == (tmp_path / "none.gguf").read_bytes()
    assert (tmp_path / "all-ranges.gguf").read_bytes() == fast


def test_a_large_vocabulary_is_copied_not_decoded(tmp_path):
    """A 128k-token vocabulary and 280k merges (Llama 3's sizes): copied byte for byte in a child process whose
    peak RSS stays far under 300 MB, and the header walk is quick."""
    vocab = [f"token-{i}" for i in range(128_000)]
    src = _synthetic(tmp_path / "src.gguf", vocab=vocab, merges=280_000)
    dst = tmp_path / "dst.gguf"
    code = (
        "import json, resource, sys, time, numpy as np\n"
        "from gguf import GGUFValueType as VT\n"
        "from convert.io.gguf_rewrite import rewrite_gguf\n"
        "s = rewrite_gguf(sys.argv[1], sys.argv[2], set_kv={'llama.context_length': (131072, VT.UINT32)},\n"
        "                 set_tensors={'rope_freqs.weight': np.ones(64, np.float32)}, progress=False)\n"
        # VmHWM: this process's own peak (ru_maxrss would carry the forking test process's peak across exec)
        "s['rss_mb'] = int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024\n"
        "print(json.dumps(s))\n")
    p = subprocess.run([sys.executable, "-c", code, str(src), str(dst)], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr[-2000:]
    s = json.loads(p.stdout.strip().splitlines()[-1])
    assert s["rss_mb"] < 300 and s["seconds"] < 10, s
    lay0, lay1 = read_layout(src), read_layout(dst)
    raw0, raw1 = src.read_bytes(), dst.read_bytes()
    k1 = {kv.key: kv for kv in lay1.kvs}
    for kv in lay0.kvs:
        if kv.key.startswith("tokenizer."):
            assert raw1[k1[kv.key].start:k1[kv.key].end] == raw0[kv.start:kv.end], kv.key
    assert read_gguf(dst).meta["tokenizer.ggml.tokens#len"] == 128_000


# ------------------------------------------------------------------------------------------- the tiny models' GGUFs
@pytest.fixture(scope="module")
def tiny_ggufs(tiny_models, tmp_path_factory):
    """The tiny models exported as test_gguf.py does: llama in q8_0 and f32, qwen2 in f16."""
    from convert.formats.gguf_export import export_gguf

    root = tmp_path_factory.mktemp("rewrite")
    return {(mt, t): export_gguf(tiny_models[(mt, False)], root / f"{mt}-{t}.gguf", t, progress=False)
            for mt, t in (("llama", "q8_0"), ("llama", "f32"), ("qwen2", "f16"))}


@pytest.mark.parametrize("which", [("llama", "q8_0"), ("qwen2", "f16")])
def test_tiny_model_ggufs_keep_every_other_byte(tiny_ggufs, tmp_path, which):
    src = tiny_ggufs[which]
    arch = read_gguf(src).meta["general.architecture"]
    factors = np.linspace(1, 4, 8, dtype=np.float32)  # head_dim 16: n_rot / 2 values
    present = "rope_freqs.weight" in {t.name for t in read_layout(src).tensors}
    set_kv = {f"{arch}.context_length": (TARGET, VT.UINT32)}
    dst = tmp_path / "ext.gguf"
    s = rewrite_gguf(src, dst, set_kv=set_kv, drop_kv=["general.name"], set_tensors={"rope_freqs.weight": factors},
                     progress=False)
    _check(src, dst, set_kv, ("general.name",), {"rope_freqs.weight": factors})
    assert (s["tensors_replaced"] if present else s["tensors_added"]) == ["rope_freqs.weight"]


def _logits(path: Path, ids: list[int]) -> np.ndarray:
    from convert.runtimes.llamacpp import llama_cpp_logits

    got, n_ctx = llama_cpp_logits(path, ids, TARGET)
    assert n_ctx == TARGET
    return got


@pytest.mark.runtime
def test_rewritten_q8_0_gguf_loads_in_llama_cpp(tiny_ggufs, tmp_path):
    from convert.runtimes.llamacpp import open_gguf

    src = tiny_ggufs[("llama", "q8_0")]
    dst = tmp_path / "ext.gguf"
    rewrite_gguf(src, dst, set_kv={"llama.context_length": (TARGET, VT.UINT32)},
                 set_tensors={"rope_freqs.weight": np.linspace(1, 4, 8, dtype=np.float32)}, progress=False)
    with open_gguf(dst, TARGET) as llm:
        assert llm.n_ctx() == TARGET and llm.metadata["llama.context_length"] == str(TARGET)
        ids = llm.tokenize(b"def f(x): return x", add_bos=True)
    # the logits through llama_decode's own output rows (llama-cpp-python's eval() leaves its scores array unwritten
    # when logits_all is off, so eval_logits would read uninitialised memory)
    assert np.isfinite(_logits(dst, ids)).all()
    # a rope_freqs of the wrong length is refused by llama.cpp (it expects n_rot / 2): the length above was read
    bad = tmp_path / "bad.gguf"
    rewrite_gguf(src, bad, set_tensors={"rope_freqs.weight": np.ones(5, np.float32)}, progress=False)
    with pytest.raises(ConvertError, match="could not load"):
        with open_gguf(bad, TARGET):
            pass


@pytest.mark.runtime
def test_rewrite_of_the_base_gguf_runs_like_the_exported_extension(tiny_models, tiny_ggufs, tmp_path):
    """The base model's f32 GGUF rewritten with the extension's keys and factors gives llama.cpp the same logits as
    the extended checkpoint exported to GGUF; replacing its factors with ones (and dropping the method's attention
    temperature) gives the base model's logits back."""
    from convert.formats.checkpoint import open_source
    from convert.formats.gguf_export import export_gguf
    from convert.runtimes.base import max_abs_diff
    from convert.stages.bake import bake, make_plan

    base = tiny_ggufs[("llama", "f32")]
    ext = bake(open_source(tiny_models[("llama", False)]), tmp_path / "ext", make_plan(target_length=TARGET),
               progress=False)
    ref = export_gguf(ext, tmp_path / "ref.gguf", "f32", progress=False)
    rb, rr = gguf.GGUFReader(str(base)), gguf.GGUFReader(str(ref))
    set_kv = {k: (f.contents(), f.types[0]) for k, f in rr.fields.items()
              if not k.startswith("GGUF.") and f.types[0] != VT.ARRAY
              and (k not in rb.fields or rb.fields[k].types != f.types or rb.fields[k].contents() != f.contents())}
    drop = [k for k in rb.fields if k not in rr.fields]
    new = {t.name: np.array(t.data) for t in rr.tensors if t.name not in {b.name for b in rb.tensors}}
    assert "llama.context_length" in set_kv and list(new) == ["rope_freqs.weight"]
    dst = tmp_path / "rewritten.gguf"
    rewrite_gguf(base, dst, set_kv=set_kv, drop_kv=drop, set_tensors=new, progress=False)
    ids = np.random.default_rng(0).integers(3, 500, 200).tolist()  # past the original window of 64
    want = _logits(ref, ids)
    got = _logits(dst, ids)
    assert max_abs_diff(want, got) < 1e-4
    base_logits = _logits(base, ids)
    assert max_abs_diff(want, base_logits) > 1e-2  # the factors matter at these positions
    ones = tmp_path / "ones.gguf"
    assert "llama.rope.scaling.attn_factor" in set_kv  # the default method's temperature
    rewrite_gguf(dst, ones, set_tensors={"rope_freqs.weight": np.ones_like(new["rope_freqs.weight"])},
                 drop_kv=["llama.rope.scaling.attn_factor"], progress=False)
    assert max_abs_diff(base_logits, _logits(ones, ids)) < 1e-3
