"""train-bpe, load_tokenizer and tokenizer_hash on real text (../shared corpora).

The full-size tokenizer is the session fixture `shakespeare_tokenizer` (trained once); everything
else trains small vocabularies on a few plays or a slice of the KJV so the file stays quick.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner
from tokenizers import Tokenizer

from qovaryx_data import load_tokenizer, tokenizer_hash, train_bpe
from qovaryx_data.cli import main
from qovaryx_data.errors import QovaryxDataError, SourceError, TokenizerError
from qovaryx_data import tokenizer as T

CONTRACT_SPECIALS = ["<|endoftext|>", "<|pad|>", "<|image_start|>", "<|image_end|>",
                     "<|decision|>", "<|reserved_0|>", "<|reserved_1|>", "<|reserved_2|>"]

HARD_STRINGS = {
    "empty": "",
    "one_char": "a",
    "crlf": "line one\r\nline two\r\n\r\n",
    "lone_cr": "a\rb\r",
    "tabs": "\tindented\t\ttext\t",
    "long_spaces": "x" + " " * 257 + "y" + " " * 1000,
    "mixed_whitespace": " \t \n\u00a0\u2003\u3000\u2028\u2029\x0b\x0c end",
    "leading_trailing_space": "   Thou art   ",
    "nul_and_controls": "\x00a\x01\x02\x1b[31mred\x1b[0m\x7f\x08",
    "c1_controls": "\x80\x85\x9f",
    "emoji": "🙂 👩🏽‍🚀 🇫🇷 ❤️ 🏳️‍🌈",
    "cjk": "日本語のテキスト，中文文本。한국어",
    "lone_combining": "\u0301\u0308 a\u0301 \u0301",
    "nfd_vs_nfc": "e\u0301 é Å A\u030a",
    "zalgo": "Z\u0351\u0364\u0315a\u0340\u0327l\u0358g\u0327o\u0361",
    "rtl": "שלום עולם مرحبا بالعالم",
    "astral": "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𓀀 \U0010fffd",
    "bom_and_specials": "\ufeffstart\ufffd\ufffe\uffff",
    "latin1_range": "".join(chr(i) for i in range(1, 256)),
    "special_literal": "before<|endoftext|>after <|pad|>",
    "near_special": "<|endoftext| <|endoftext|x <|",
    "long_word": "a" * 5000 + "Honorificabilitudinitatibus" * 50,
    "code": "def f(x):\n\treturn x**2  # ok\n\n\n    if x != 0: pass\r\n",
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8", newline="")
    return path


def _cli(*args: str):
    return CliRunner().invoke(main, ["train-bpe", *args])


def _cli_error(*args: str) -> str:
    """Run train-bpe expecting a user error: exit 2, one `error:` line, no traceback."""
    r = _cli(*args)
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert isinstance(r.exception, SystemExit)
    assert r.output.startswith("error: ") and "Traceback" not in r.output, r.output
    return r.output


@pytest.fixture(scope="module")
def kjv_lines(kjv_path, tmp_path_factory) -> Path:
    """The first 4,000 verses of the KJV, one per line (small, real, quick to train on)."""
    lines = kjv_path.read_text(encoding="utf-8").splitlines()[:4000]
    return _write(tmp_path_factory.mktemp("kjv") / "kjv4000.txt", "\n".join(lines) + "\n")


# ---------------------------------------------------------------- the full-size tokenizer

def test_full_size_vocab_and_contract_ids(shakespeare_tokenizer):
    tok = load_tokenizer(shakespeare_tokenizer)
    assert tok.get_vocab_size(with_added_tokens=True) == 20242
    assert tok.get_vocab_size(with_added_tokens=False) == 20242   # specials live in the model vocab
    assert [tok.id_to_token(i) for i in range(8)] == CONTRACT_SPECIALS
    assert tok.token_to_id("Ġthe") is not None and tok.token_to_id("ĠHamlet") is not None
    assert tok.normalizer is None
    meta = json.loads((shakespeare_tokenizer / "qovaryx_tokenizer.json").read_text())
    assert (meta["format"], meta["version"]) == ("qovaryx-tokenizer", 1)
    assert meta["hash"] == tokenizer_hash(shakespeare_tokenizer) == tokenizer_hash(tok)
    assert meta["vocab_size"] == 20242 and meta["documents"] == 42
    assert (meta["bos_token_id"], meta["eos_token_id"], meta["pad_token_id"]) == (0, 0, 1)
    assert meta["special_tokens"] == {t: i for i, t in enumerate(CONTRACT_SPECIALS)}
    assert meta["config"]["min_frequency"] == T.DEFAULT_MIN_FREQUENCY
    import tokenizers
    assert meta["tokenizers_version"] == tokenizers.__version__


@pytest.mark.parametrize("name", sorted(HARD_STRINGS))
def test_round_trip_hard_strings(shakespeare_tokenizer, name):
    tok = load_tokenizer(shakespeare_tokenizer)
    s = HARD_STRINGS[name]
    ids = tok.encode(s).ids
    assert tok.decode(ids, skip_special_tokens=False) == s
    if "<|endoftext|>" not in s and "<|pad|>" not in s:
        assert min(ids, default=8) >= 8, "no special token may appear in ordinary text"


def test_no_normalization_known_answer(shakespeare_tokenizer):
    tok = load_tokenizer(shakespeare_tokenizer)
    # NFC and NFD spellings stay distinct; the literal special token is the special id.
    assert tok.encode("\u00e9").ids != tok.encode("e\u0301").ids
    assert tok.encode("a<|endoftext|>b").ids == tok.encode("a").ids + [0] + tok.encode("b").ids
    # Byte fallback is the byte alphabet itself: NUL is one token, the byte symbol 'Ā'.
    assert tok.encode("\x00").tokens == ["Ā"]


def test_round_trip_whole_real_files(shakespeare_tokenizer, shakespeare_files, austen_path,
                                     kjv_path, tmp_path):
    tok = load_tokenizer(shakespeare_tokenizer)
    texts = [p.read_text(encoding="utf-8") for p in (shakespeare_files[0], austen_path, kjv_path)]
    texts.append(texts[0].replace("\n", "\r\n"))   # the same play with Windows line ends
    for text in texts:
        ids = tok.encode(text).ids
        assert tok.decode(ids, skip_special_tokens=False) == text
        assert len(ids) < len(text) / 3   # real compression, not one token per byte


# ---------------------------------------------------------------- transformers, without qovaryx

_HF_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.modules["qovaryx_data"] = sys.modules["qovaryx_model"] = None   # as if not installed
    try:
        import qovaryx_data
        raise SystemExit("qovaryx_data is importable")
    except ImportError:
        pass
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    d, other, text_file = sys.argv[1:]
    text = open(text_file, encoding="utf-8", newline="").read()
    hf = AutoTokenizer.from_pretrained(d)
    raw = Tokenizer.from_file(d + "/tokenizer.json")
    ids = hf(text)["input_ids"]
    hf.save_pretrained(other)
    print(json.dumps({
        "fast": isinstance(hf, PreTrainedTokenizerFast),
        "len": len(hf),
        "tokens": [hf.bos_token, hf.eos_token, hf.pad_token],
        "token_ids": [hf.bos_token_id, hf.eos_token_id, hf.pad_token_id],
        "parity": ids == raw.encode(text).ids,
        "encode_parity": hf.encode(text) == raw.encode(text).ids,
        "n_ids": len(ids),
        "round_trip": hf.decode(ids) == text,
        "specials": hf.convert_ids_to_tokens(list(range(8))),
    }))
""")


def test_autotokenizer_without_qovaryx_parity_and_hash(shakespeare_tokenizer, shakespeare_files,
                                                       tmp_path):
    text_file = _write(tmp_path / "mixed.txt", shakespeare_files[-1].read_text(encoding="utf-8")
                       + "".join(HARD_STRINGS.values()))
    other = tmp_path / "resaved"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["HF_HUB_OFFLINE"] = "1"
    r = subprocess.run([sys.executable, "-I", "-c", _HF_SCRIPT, str(shakespeare_tokenizer),
                        str(other), str(text_file)],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["fast"] and got["len"] == 20242
    assert got["tokens"] == ["<|endoftext|>", "<|endoftext|>", "<|pad|>"]
    assert got["token_ids"] == [0, 0, 1]
    assert got["parity"] and got["encode_parity"], "AutoTokenizer adds or changes ids"
    assert got["n_ids"] > 10_000
    assert got["round_trip"]
    assert got["specials"] == CONTRACT_SPECIALS
    # save_pretrained rewrites the files; the hash of what defines the encoding is unchanged
    assert tokenizer_hash(other) == tokenizer_hash(shakespeare_tokenizer)


# ---------------------------------------------------------------- hash

def test_hash_ignores_file_layout_and_tracks_encoding(small_tokenizer, tmp_path):
    tok = load_tokenizer(small_tokenizer)
    h = tokenizer_hash(small_tokenizer)
    assert len(h) == 64 and int(h, 16) >= 0
    assert tokenizer_hash(small_tokenizer / "tokenizer.json") == h

    spec = json.loads((small_tokenizer / "tokenizer.json").read_text(encoding="utf-8"))
    compact = tmp_path / "compact.json"
    compact.write_text(json.dumps(spec, separators=(",", ":"), sort_keys=True), encoding="utf-8")
    assert tokenizer_hash(compact) == h                      # same content, other bytes

    no_pp = dict(spec, post_processor=None)                 # encodes the same: same hash
    _write(tmp_path / "no_pp.json", json.dumps(no_pp))
    assert tokenizer_hash(tmp_path / "no_pp.json") == h

    def changed(mutate) -> str:
        s = json.loads(json.dumps(spec))
        mutate(s)
        f = tmp_path / "changed.json"
        _write(f, json.dumps(s))
        return tokenizer_hash(f)

    def drop_last_merge(s):
        last = s["model"]["merges"].pop()
        merged = "".join(last) if isinstance(last, list) else last.replace(" ", "")
        del s["model"]["vocab"][merged]

    def rename_special(s):
        s["added_tokens"][4]["content"] = "<|other|>"

    def prefix_space(s):
        s["pre_tokenizer"]["add_prefix_space"] = True

    def swap_ids(s):
        v = s["model"]["vocab"]
        a, b = "Ġthe", "Ġand"
        v[a], v[b] = v[b], v[a]

    for mutate in (drop_last_merge, rename_special, prefix_space, swap_ids):
        assert changed(mutate) != h, mutate.__name__
    assert changed(lambda s: s.update(truncation={"max_length": 8, "strategy": "LongestFirst",
                                                  "stride": 0, "direction": "Right"})) == h
    assert tok.get_vocab_size() == 2048
    with pytest.raises(TypeError):
        tokenizer_hash(42)


# ---------------------------------------------------------------- training behaviour

def test_known_answer_first_merge(tmp_path):
    # "aaabdaaabac": pairs aa x4, ab x2, others x1 -> the one merge allowed is a+a, id 264.
    f = _write(tmp_path / "c.txt", "aaabdaaabac")
    r = train_bpe([str(f)], out=tmp_path / "tok", vocab_size=265, min_frequency=1)
    tok = load_tokenizer(r.out)
    assert r.vocab_size == 265 and tok.id_to_token(264) == "aa"
    assert tok.encode("aaab").tokens == ["aa", "a", "b"]
    assert json.loads(tok.to_str())["model"]["merges"] == [["a", "a"]]
    assert (r.documents, r.characters) == (1, 11)


def test_deterministic_full_size(shakespeare_tokenizer, shakespeare_files, tmp_path):
    # retrain with the inputs in another order of arguments (a folder instead of the file list)
    train_bpe([str(shakespeare_files[0].parent / "*_gut.txt")], out=tmp_path / "again")
    a = (shakespeare_tokenizer / "tokenizer.json").read_bytes()
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == a


def test_deterministic_small_and_same_out_again(kjv_lines, tmp_path):
    out = tmp_path / "tok"
    r1 = train_bpe([str(kjv_lines)], out=out, vocab_size=1000, split="line")
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    r2 = train_bpe([str(kjv_lines)], out=out, vocab_size=1000, split="line")   # same again: fine
    assert r1.hash == r2.hash
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    assert sorted(first) == ["qovaryx_tokenizer.json", "tokenizer.json", "tokenizer_config.json"]
    r3 = train_bpe([str(kjv_lines)], out=tmp_path / "other", vocab_size=1000, split="line")
    assert (tmp_path / "other" / "tokenizer.json").read_bytes() == first["tokenizer.json"]
    assert r3.documents == 4000


def test_min_frequency_only_decides_when_to_stop(kjv_lines, tmp_path):
    """BPE merges by count, so where 2 reaches the size, 1 gives the identical tokenizer."""
    two = train_bpe([str(kjv_lines)], out=tmp_path / "two", vocab_size=800, split="line")
    one = train_bpe([str(kjv_lines)], out=tmp_path / "one", vocab_size=800, split="line",
                    min_frequency=1)
    assert two.vocab_size == 800 and one.hash == two.hash
    many = train_bpe([str(kjv_lines)], out=tmp_path / "many", vocab_size=800, split="line",
                     min_frequency=500, allow_smaller_vocab=True)
    assert 264 < many.vocab_size < 800


def test_deterministic_with_one_thread(kjv_lines, tmp_path):
    """The result does not depend on the trainer's parallelism (TOKENIZERS_PARALLELISM=false)."""
    par = train_bpe([str(kjv_lines)], out=tmp_path / "par", vocab_size=1000, split="line")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", RAYON_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "qovaryx_data.cli", "train-bpe", str(kjv_lines),
                        "--out", str(tmp_path / "seq"), "--vocab-size", "1000", "--split", "line"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert par.hash in r.stdout
    assert (tmp_path / "seq" / "tokenizer.json").read_bytes() == \
        (tmp_path / "par" / "tokenizer.json").read_bytes()


def test_out_holding_another_tokenizers_files_is_refused_unless_forced(kjv_lines, tmp_path):
    """An --out with a GPT-2 style tokenizer (vocab.json + merges.txt + tokenizer_config.json, no
    tokenizer.json) is another tokenizer: refused unless --force; forced, its files are replaced
    (transformers would read them over ours) and other files are left alone. Any tokenizer file
    counts."""
    out = tmp_path / "t"
    out.mkdir()
    _write(out / "vocab.json", '{"hello": 0}')
    _write(out / "merges.txt", "#version: 0.2\nh e\n")
    _write(out / "tokenizer_config.json", '{"tokenizer_class": "GPT2Tokenizer"}')
    _write(out / "notes.md", "mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(TokenizerError, match=r"holds another tokenizer's files \(tokenizer_config"
                                             r"\.json, vocab\.json, merges\.txt\).*--force"):
        train_bpe([str(kjv_lines)], out=out, vocab_size=300, split="line")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    r = CliRunner().invoke(main, ["train-bpe", str(kjv_lines), "--out", str(out),
                                  "--vocab-size", "300", "--split", "line"])
    assert r.exit_code != 0 and "--force" in r.output
    for name in ("special_tokens_map.json", "tokenizer.model"):
        lone = tmp_path / name.split(".")[0]
        lone.mkdir()
        _write(lone / name, "{}")
        with pytest.raises(TokenizerError, match=re.escape(name)):
            train_bpe([str(kjv_lines)], out=lone, vocab_size=300, split="line")
    train_bpe([str(kjv_lines)], out=out, vocab_size=300, split="line", force=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "notes.md", "qovaryx_tokenizer.json", "tokenizer.json", "tokenizer_config.json"]
    # a stray vocab.json beside our own tokenizer.json counts too (re-training would delete it)
    _write(out / "vocab.json", '{"hello": 0}')
    with pytest.raises(TokenizerError, match=r"beside tokenizer\.json, other tokenizer files \(vocab\.json\).*--force"):
        train_bpe([str(kjv_lines)], out=out, vocab_size=300, split="line")
    assert (out / "vocab.json").read_text() == '{"hello": 0}'


def test_all_input_formats_give_the_same_tokenizer(kjv_lines, tmp_path):
    """The same 4,000 verses as .txt lines, .jsonl, .jsonl.zst, .parquet and a datasets folder."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    verses = kjv_lines.read_text(encoding="utf-8").splitlines()
    jsonl = "".join(json.dumps({"id": i, "body": v}) + "\n" for i, v in enumerate(verses))
    _write(tmp_path / "v.jsonl", jsonl)
    (tmp_path / "v.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl.encode()))
    pq.write_table(pa.table({"body": verses}), tmp_path / "v.parquet", row_group_size=1000)
    datasets.Dataset.from_dict({"body": verses}).save_to_disk(str(tmp_path / "v_hf"))

    ref = train_bpe([str(kjv_lines)], out=tmp_path / "ref", vocab_size=1000, split="line").hash
    for name in ("v.jsonl", "v.jsonl.zst", "v.parquet", "v_hf"):
        r = train_bpe([str(tmp_path / name)], out=tmp_path / f"tok_{name}", vocab_size=1000,
                      text_field="body")
        assert (r.documents, r.hash) == (4000, ref), name


def test_splits_and_globs(shakespeare_files, tmp_path):
    d = tmp_path / "plays"
    d.mkdir()
    for p in shakespeare_files[:3]:
        _write(d / p.name, p.read_text(encoding="utf-8"))
    by_file = train_bpe([str(d)], out=tmp_path / "f", vocab_size=600)
    by_glob = train_bpe([str(d / "*.txt")], out=tmp_path / "g", vocab_size=600)
    by_para = train_bpe([str(d)], out=tmp_path / "p", vocab_size=600, split="paragraph")
    by_line = train_bpe([str(d)], out=tmp_path / "l", vocab_size=600, split="line")
    assert by_file.documents == 3 and by_glob.hash == by_file.hash
    assert 3 < by_para.documents < by_line.documents
    assert by_para.characters < by_file.characters   # separators are not part of documents


def test_extra_special_tokens(tmp_path, kjv_lines):
    r = _cli(str(kjv_lines), "--out", str(tmp_path / "t"), "--vocab-size", "600", "--split", "line",
             "--special-token", "<|user|>", "--special-token", "<|assistant|>")
    assert r.exit_code == 0, r.output
    tok = load_tokenizer(tmp_path / "t")
    assert tok.get_vocab_size() == 600
    assert [tok.id_to_token(i) for i in range(10)] == CONTRACT_SPECIALS + ["<|user|>", "<|assistant|>"]
    assert tok.encode("hi<|user|>").ids[-1] == 8
    cfg = json.loads((tmp_path / "t" / "tokenizer_config.json").read_text())
    assert cfg["extra_special_tokens"][-2:] == ["<|user|>", "<|assistant|>"]
    assert "wrote" in r.output and "600 tokens" in r.output


def test_cli_default_output_and_help():
    r = CliRunner().invoke(main, ["train-bpe", "--help"])
    assert r.exit_code == 0
    for opt in ("--out", "--vocab-size", "--min-frequency", "--text-field", "--split", "--format",
                "--special-token", "--errors", "--allow-smaller-vocab", "--force"):
        assert opt in r.output
    assert "20242" in r.output


def test_cli_imports_nothing_heavy(kjv_lines, tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from qovaryx_data.cli import main
        try:
            main(["train-bpe", {str(kjv_lines)!r}, "--out", {str(tmp_path / 't')!r},
                  "--vocab-size", "300", "--split", "line"])
        except SystemExit as e:
            assert not e.code, e.code
        heavy = ("torch", "transformers", "datasets", "pyarrow", "pandas", "numpy")
        print(sorted(m for m in sys.modules if m.split(".")[0] in heavy))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "t" / "tokenizer.json").exists()


# ---------------------------------------------------------------- bad inputs

def test_error_missing_file(tmp_path):
    out = _cli_error(str(tmp_path / "nope.txt"), "--out", str(tmp_path / "t"))
    assert "nope.txt" in out and "no such file" in out
    assert not (tmp_path / "t").exists()


def test_error_empty_corpus(tmp_path):
    _write(tmp_path / "blank.txt", "  \n\n\t\n")
    out = _cli_error(str(tmp_path / "blank.txt"), "--out", str(tmp_path / "t"))
    assert "empty corpus" in out and "blank.txt" in out


def test_error_malformed_jsonl_line(tmp_path):
    _write(tmp_path / "bad.jsonl", '{"text": "fine"}\n{"text": "fine too"}\n{"text": oops\n')
    out = _cli_error(str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "t"), "--vocab-size", "300")
    assert "bad.jsonl" in out and "line 3" in out


def test_error_missing_text_field(tmp_path):
    _write(tmp_path / "f.jsonl", '{"content": "To be, or not to be"}\n')
    out = _cli_error(str(tmp_path / "f.jsonl"), "--out", str(tmp_path / "t"), "--vocab-size", "300")
    assert "f.jsonl" in out and "text" in out and "line 1" in out
    _write(tmp_path / "n.jsonl", '{"text": "fine"}\n{"text": 17}\n')
    out = _cli_error(str(tmp_path / "n.jsonl"), "--out", str(tmp_path / "t"), "--vocab-size", "300")
    assert "n.jsonl" in out and "line 2" in out


def test_invalid_utf8_strict_and_replace(tmp_path, shakespeare_files):
    play = shakespeare_files[1].read_bytes()
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(play + "\nCaf\u00e9 cr\u00e8me\n".encode("latin-1"))
    out = _cli_error(str(bad), "--out", str(tmp_path / "t"), "--vocab-size", "400")
    assert "latin1.txt" in out and "UTF-8" in out and "--errors replace" in out
    r = _cli(str(bad), "--out", str(tmp_path / "t"), "--vocab-size", "400", "--errors", "replace")
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "t" / "qovaryx_tokenizer.json").read_text())
    assert meta["config"]["errors"] == "replace"
    assert meta["characters"] == len(play.decode("utf-8")) + len("\nCaf\ufffd cr\ufffdme\n")


@pytest.mark.parametrize("args", [["--vocab-size", "263"],
                                  ["--vocab-size", "264", "--special-token", "<|x|>"],
                                  ["--vocab-size", "0"]])
def test_error_vocab_below_alphabet(tmp_path, kjv_lines, args):
    out = _cli_error(str(kjv_lines), "--out", str(tmp_path / "t"), *args)
    assert "too small" in out and "256 byte symbols" in out


def test_vocab_boundary_alphabet_plus_specials_is_allowed(tmp_path, kjv_lines):
    r = train_bpe([str(kjv_lines)], out=tmp_path / "t", vocab_size=264)
    assert r.vocab_size == 264
    tok = load_tokenizer(r.out)
    s = "In the beginning 🙂"
    assert len(tok.encode(s).ids) == len(s.encode("utf-8"))   # bytes only, no merges
    assert tok.decode(tok.encode(s).ids) == s


def test_config_errors_are_value_errors_and_tokenizer_errors(tmp_path, kjv_lines):
    for kwargs in ({"vocab_size": 100}, {"min_frequency": 0}, {"split": "sentence"},
                   {"errors": "ignore"}, {"format": "xml"}, {"special_tokens": ["<|pad|>"]},
                   {"special_tokens": [""]}, {"text_field": ""}):
        with pytest.raises(ValueError) as e:
            train_bpe([str(kjv_lines)], out=tmp_path / "t", **kwargs)
        assert isinstance(e.value, TokenizerError), kwargs
    with pytest.raises(TokenizerError, match="no input"):
        train_bpe([], out=tmp_path / "t")


def test_corpus_too_small_for_vocab(tmp_path, shakespeare_files):
    one = str(shakespeare_files[0])
    out = _cli_error(one, "--out", str(tmp_path / "t"))
    assert "too small for --vocab-size 20242" in out and "stopped at" in out
    for fix in ("more text", "smaller --vocab-size", "--min-frequency", "--allow-smaller-vocab"):
        assert fix in out
    assert not (tmp_path / "t").exists()
    r = _cli(one, "--out", str(tmp_path / "t"), "--allow-smaller-vocab")
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "t" / "qovaryx_tokenizer.json").read_text())
    assert 264 < meta["vocab_size"] < 20242
    assert load_tokenizer(tmp_path / "t").get_vocab_size() == meta["vocab_size"]


def test_out_folder_with_a_different_tokenizer(tmp_path, shakespeare_files):
    a, b = str(shakespeare_files[0]), str(shakespeare_files[1])
    out = tmp_path / "t"
    assert _cli(a, "--out", str(out), "--vocab-size", "500").exit_code == 0
    before = (out / "tokenizer.json").read_bytes()

    msg = _cli_error(b, "--out", str(out), "--vocab-size", "500")      # other text: refused
    assert "different tokenizer" in msg and "--force" in msg
    msg = _cli_error(a, "--out", str(out), "--vocab-size", "600")      # other size: refused early
    assert "different tokenizer" in msg
    assert (out / "tokenizer.json").read_bytes() == before
    assert _cli(a, "--out", str(out), "--vocab-size", "500").exit_code == 0   # same: fine

    r = _cli(b, "--out", str(out), "--vocab-size", "500", "--force")
    assert r.exit_code == 0, r.output
    assert (out / "tokenizer.json").read_bytes() != before
    assert json.loads((out / "qovaryx_tokenizer.json").read_text())["hash"] == tokenizer_hash(out)


def test_out_folder_unusable(tmp_path, kjv_lines):
    f = _write(tmp_path / "file", "x")
    assert "is a file" in _cli_error(str(kjv_lines), "--out", str(f), "--vocab-size", "300")
    d = tmp_path / "broken"
    d.mkdir()
    _write(d / "tokenizer.json", "{not json")
    assert "cannot be read" in _cli_error(str(kjv_lines), "--out", str(d), "--vocab-size", "300")
    r = _cli(str(kjv_lines), "--out", str(d), "--vocab-size", "300", "--force")
    assert r.exit_code == 0, r.output


def test_load_tokenizer_refuses_bad_folders(small_tokenizer, tmp_path):
    with pytest.raises(TokenizerError, match="no such tokenizer file"):
        load_tokenizer(tmp_path / "missing")
    # a newer metadata version
    d = tmp_path / "v2"
    d.mkdir()
    for p in small_tokenizer.iterdir():
        (d / p.name).write_bytes(p.read_bytes())
    meta = json.loads((d / "qovaryx_tokenizer.json").read_text())
    (d / "qovaryx_tokenizer.json").write_text(json.dumps(dict(meta, version=2)))
    with pytest.raises(TokenizerError, match="version 2.*reads version 1"):
        load_tokenizer(d)
    # tokenizer.json edited behind the metadata's back
    (d / "qovaryx_tokenizer.json").write_text(json.dumps(meta))
    spec = json.loads((d / "tokenizer.json").read_text())
    spec["model"]["merges"] = spec["model"]["merges"][:-1]
    (d / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(TokenizerError, match="does not match.*edited or mixed up"):
        load_tokenizer(d)
    (d / "qovaryx_tokenizer.json").write_text(json.dumps(dict(meta, tokenizers_version="0.1.0")))
    with pytest.raises(TokenizerError, match="written with tokenizers 0.1.0"):
        load_tokenizer(d)
    assert isinstance(load_tokenizer(small_tokenizer), Tokenizer)


def test_errors_are_qovaryx_errors(tmp_path):
    with pytest.raises(SourceError) as e:
        train_bpe([str(tmp_path / "missing.jsonl")], out=tmp_path / "t")
    assert isinstance(e.value, QovaryxDataError) and e.value.reason == "no_match"
