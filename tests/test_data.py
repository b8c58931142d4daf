"""Tokenizers, corpus readers, the token cache and the deterministic sampling rule of models/data/."""

import json
import os
import time
from collections import Counter

import numpy as np
import pytest
import torch

from curvtrain.models.data import tokens as data_module
from curvtrain.models.data.corpus import corpus_fingerprint, iter_documents, wiki_to_text
from curvtrain.models.data import DataConfig, TokenData, prepare_tokens
from curvtrain.models.data.readers import ReadOptions, SkippedFileWarning
from curvtrain.models.data.tokenizer import Tokenizer

# ---- tokenizer -----------------------------------------------------------------------------------


def test_tokenizer_round_trips_text():
    tok = Tokenizer.load()
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32000, 1, 2)
    assert tok.path.name == "tokenizer.model.v1"
    text = "The Eiffel Tower, built in 1889, is 330 m tall. Ünïcödé and\nnew lines\ttoo!"
    ids = tok.encode(text)
    assert ids and tok.bos_id not in ids and tok.eos_id not in ids
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "second"]) == [ids, tok.encode("second")]
    assert Tokenizer.load(str(tok.path)).encode(text) == ids


def test_tokenizer_errors_name_the_spec(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer '/no/such.model': no such file"):
        Tokenizer.load("/no/such.model")
    junk = tmp_path / "junk.model"
    junk.write_text("not a model")
    with pytest.raises(ValueError, match="junk.model is not a valid SentencePiece model"):
        Tokenizer.load(str(junk))


# ---- corpora -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wiki_docs():
    return list(iter_documents("wiki-sample"))


def test_wiki_sample_is_plain_prose(wiki_docs):
    assert len(wiki_docs) > 100
    assert sum(map(len, wiki_docs)) > 2_000_000
    assert wiki_docs[0].startswith("Anarchism is a political philosophy that advocates self-governed societies")
    for doc in wiki_docs:
        for markup in ("{{", "}}", "[[", "]]", "<ref", "</", "'''", "==", "&nbsp;", "thumb|"):
            assert markup not in doc, (markup, doc[:200])
        letters = sum(c.isalpha() for c in doc)
        assert letters > 0.6 * len(doc), doc[:200]
    assert sum(". " in doc for doc in wiki_docs) > 0.9 * len(wiki_docs)  # sentences, not word lists


def test_wiki_markup_to_text():
    wikitext = (
        "{{Infobox person|name={{nowrap|A B}}}}\n'''Ada''' was a [[mathematician|mathematical]] [[poet]]."
        "<ref>Cited, p. 3.</ref> She ({{IPAc-en|ˈ|eɪ|d|ə}}; {{lang|fr|[[Ada (name)|Ada]]}}) "
        "wrote [http://x.org notes]; "
        "{{IPAc-en|ˈ|eɪ|d|ə}} ({{convert|2|to|3|km}}, {{nowrap|{{IPA|x}}}}).\n"
        "[[File:Ada.jpg|thumb|Ada in [[1840]] [left].]]\n== Life ==\n* Born in [[London]].\n"
        "{| class=wikitable\n|-\n| cell || cell\n|}\n== References ==\n{{reflist}}\n* Book.\n"
        "=== Sources ===\nMore.\n[[Category:People]]\n[[de:Ada]]"
    )
    expected = "Ada was a mathematical poet. She (Ada) wrote notes; (2 to 3 km).\n\nLife\nBorn in London."
    assert wiki_to_text(wikitext) == expected


def test_lee_corpus_is_one_story_per_line():
    docs = list(iter_documents("lee"))
    assert len(docs) == 300
    assert docs[0].startswith("Hundreds of people have been forced to vacate their homes")


@pytest.fixture
def user_corpus(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("Document b.")
    (root / "sub" / "c.txt").write_text("Document c,\nover two lines.")
    (root / "a.jsonl").write_text(json.dumps({"text": "Line one."}) + "\n\n" + json.dumps({"text": "Line two."}))
    (root / "notes.md").write_text("ignored")
    (root / "empty.txt").write_text("  \n")
    return root


def test_user_corpus_reads_txt_and_jsonl_in_sorted_order(user_corpus):
    expected = ["Line one.", "Line two.", "Document b.", "Document c,\nover two lines."]
    assert list(iter_documents(str(user_corpus))) == expected
    assert list(iter_documents(str(user_corpus / "sub" / "c.txt"))) == expected[3:]


def test_fingerprint_follows_content(user_corpus):
    before = corpus_fingerprint(str(user_corpus))
    assert corpus_fingerprint(str(user_corpus)) == before
    (user_corpus / "b.txt").write_text("Document b, edited.")
    assert corpus_fingerprint(str(user_corpus)) != before
    assert corpus_fingerprint("wiki-sample") != corpus_fingerprint("lee")


def test_user_corpus_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a built-in corpus .* nor an existing path"):
        iter_documents(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"holds no files ending in one of \('.txt', '.jsonl'"):
        iter_documents(str(tmp_path / "empty"))
    (tmp_path / "doc.md").write_text("x")
    with pytest.raises(ValueError, match=r"must end in one of \('.txt', '.jsonl', '.jsonl.gz'"):
        iter_documents(str(tmp_path / "doc.md"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: invalid JSON"):
        list(iter_documents(str(bad)))
    bad.write_text('{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r'bad.jsonl, line 1: expected a JSON object with a string "text" field'):
        list(iter_documents(str(bad)))


# ---- the token cache -----------------------------------------------------------------------------


def test_data_config_validation(monkeypatch):
    with pytest.raises(ValueError, match="seq_len"):
        DataConfig(seq_len=0)
    for fraction in (0.0, 1.0):
        with pytest.raises(ValueError, match="val_fraction"):
            DataConfig(val_fraction=fraction)
    with pytest.raises(ValueError, match="seed"):
        DataConfig(seed=-1)
    monkeypatch.setenv("CURVTRAIN_CACHE", "/elsewhere")
    assert DataConfig().cache_dir == "/elsewhere"
    assert DataConfig(cache_dir="/explicit").cache_dir == "/explicit"


def test_prepare_tokens_writes_every_document_then_eos(user_corpus, tmp_path):
    cfg = DataConfig(corpus=str(user_corpus), cache_dir=str(tmp_path / "cache"), seq_len=2, val_fraction=0.2)
    out = prepare_tokens(cfg)
    tok = Tokenizer.load()
    expected = [t for doc in iter_documents(str(user_corpus)) for t in tok.encode(doc) + [tok.eos_id]]
    assert np.fromfile(out / "tokens.bin", dtype=np.uint16).tolist() == expected
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["num_tokens"], meta["num_docs"], meta["vocab_size"]) == (len(expected), 4, 32000)
    assert sorted(os.listdir(out)) == ["meta.json", "tokens.bin"]


def test_prepare_tokens_is_cached(user_corpus, tmp_path, monkeypatch):
    cfg = DataConfig(corpus=str(user_corpus), cache_dir=str(tmp_path / "cache"), seq_len=2, val_fraction=0.2)
    out = prepare_tokens(cfg)
    mtime = (out / "tokens.bin").stat().st_mtime_ns

    def no_tokenizing(spec, opts):
        raise AssertionError("a cache hit must not read the corpus")

    with monkeypatch.context() as m:
        m.setattr(data_module, "iter_pieces", no_tokenizing)
        assert prepare_tokens(cfg) == out
    assert (out / "tokens.bin").stat().st_mtime_ns == mtime
    (user_corpus / "b.txt").write_text("Document b, now longer.")
    assert prepare_tokens(cfg) != out  # changed corpus, fresh cache entry


def test_prepare_tokens_leaves_nothing_when_it_fails(user_corpus, tmp_path, monkeypatch):
    def failing_corpus(spec, opts):
        yield "A first document.", True
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(data_module, "iter_pieces", failing_corpus)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="disk on fire"):
        prepare_tokens(DataConfig(corpus=str(user_corpus), cache_dir=str(cache)))
    assert [p.name for p in cache.rglob("*") if p.is_file()] == []


def test_prepare_tokens_rejects_a_too_small_corpus(tmp_path):
    (tmp_path / "tiny.txt").write_text("Too short.")
    cfg = DataConfig(corpus=str(tmp_path / "tiny.txt"), cache_dir=str(tmp_path / "cache"), seq_len=64)
    with pytest.raises(ValueError, match=r"tiny.txt' has \d+ tokens: too few for one training and one validation"):
        prepare_tokens(cfg)


def test_prepare_the_wiki_sample(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path))
    start = time.perf_counter()
    data = TokenData.from_config(cfg)
    seconds = time.perf_counter() - start
    meta = json.loads((next(tmp_path.iterdir()) / "meta.json").read_text())
    print(f"wiki-sample: {meta['num_docs']} docs, {meta['num_tokens']} tokens, prepared in {seconds:.2f} s")
    assert seconds < 20
    assert meta["num_docs"] > 100 and meta["num_tokens"] > 500_000
    assert data.num_train_samples > 4000 and data.num_val_samples > 100
    inputs, _ = data.train_batch(step=0, micro_step=0, rank=0, world_size=1, micro_batch_size=2, grad_accum=1)
    assert sum(c.isalpha() for c in Tokenizer.load().decode(inputs[0].tolist())) > 300


# ---- deterministic sampling ----------------------------------------------------------------------

SEQ_LEN = 4
NUM_TOKENS = 1000  # token value = its position in the stream, so samples reveal where they were read


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "tokens.bin"
    np.arange(NUM_TOKENS, dtype=np.uint16).tofile(path)
    return path


def make_data(token_file, seed=0):
    return TokenData(token_file, seq_len=SEQ_LEN, val_fraction=0.1, seed=seed)


def batch(data, step, micro_step=0, rank=0, world_size=1, micro_batch_size=4, grad_accum=1):
    return data.train_batch(step, micro_step, rank, world_size, micro_batch_size, grad_accum)


def test_regions_and_sample_shapes(token_file):
    data = make_data(token_file)
    assert (data.num_train_samples, data.num_val_samples) == ((900 - 1) // SEQ_LEN, (100 - 1) // SEQ_LEN)
    inputs, targets = batch(data, step=3, micro_batch_size=5)
    assert inputs.shape == targets.shape == (5, SEQ_LEN) and inputs.dtype == torch.int64
    assert torch.equal(targets, inputs + 1)  # shifted by one token
    assert torch.equal(inputs[:, 0] % SEQ_LEN, torch.zeros(5, dtype=torch.int64))  # chunk starts at i * seq_len
    train_pairs = [batch(data, step, micro_batch_size=1) for step in range(data.num_train_samples)]
    train = {t for pair in train_pairs for part in pair for t in part.flatten().tolist()}
    val = {t for pair in data.val_batches(1, rank=0, world_size=1) for part in pair for t in part.flatten().tolist()}
    assert max(train) < 900 <= min(val)  # validation is the end of the stream, disjoint from training
    assert train == set(range(data.num_train_samples * SEQ_LEN + 1))


def test_batches_are_deterministic_and_seeded(token_file):
    a, b = make_data(token_file), make_data(token_file)
    for step in range(5):  # `a` walks the steps in order, `b` jumps (a resumed run)
        batch(a, step)
    assert torch.equal(batch(a, 7)[0], batch(b, 7)[0])
    assert not torch.equal(batch(a, 7)[0], batch(make_data(token_file, seed=1), 7)[0])


def test_ranks_see_disjoint_samples(token_file):
    data = make_data(token_file)
    for step in (0, 11, 40):
        chunks = [data.sample_indices(step, micro_step, rank, 3, 4, 2) for micro_step in range(2) for rank in range(3)]
        assert len(set(np.concatenate(chunks).tolist())) == 24


def test_one_worker_with_accumulation_sees_the_global_batch_of_two_workers(token_file):
    data = make_data(token_file)
    for step in range(60):  # a few epochs of 224 chunks in global batches of 8
        one_worker = [data.sample_indices(step, m, 0, 1, 4, 2) for m in range(2)]
        two_workers = [data.sample_indices(step, 0, r, 2, 4, 1) for r in range(2)]
        assert Counter(np.concatenate(one_worker).tolist()) == Counter(np.concatenate(two_workers).tolist())


def test_every_chunk_once_per_epoch(token_file):
    data = make_data(token_file)
    n = data.num_train_samples
    micro_batch_size = 5  # does not divide n: micro-batches straddle epoch boundaries
    chunks = np.concatenate([data.sample_indices(s, 0, 0, 1, micro_batch_size, 1) for s in range(3 * n // 5 + 1)])
    epochs = [chunks[e * n : (e + 1) * n] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(n))
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch


def test_val_batches_split_across_ranks(token_file):
    data = make_data(token_file)  # 24 validation chunks
    per_rank = [list(data.val_batches(micro_batch_size=2, rank=r, world_size=3, max_samples=15)) for r in range(3)]
    assert [len(batches) for batches in per_rank] == [2, 2, 2]  # 15 chunks: 7 micro-batches, 6 used
    firsts = sorted(int(inputs[i, 0]) for batches in per_rank for inputs, _ in batches for i in range(2))
    assert firsts == [900 + i * SEQ_LEN for i in range(12)]  # the first 12 validation chunks, each once
    assert len(list(data.val_batches(micro_batch_size=4, rank=0, world_size=1))) == 6
    with pytest.raises(ValueError, match="too few for one micro-batch"):
        data.val_batches(micro_batch_size=4, rank=0, world_size=2, max_samples=7)


# ---- Hugging Face tokenizers and uint32 token files ------------------------------------------------

BPE_TEXT = ["The quick brown fox jumps over the lazy dog.", "Tokenizers split text into pieces; 12345 digits.",
            "Ünïcödé text, tabs\tand\nnew lines."] * 20


def train_bpe(folder, vocab_size=300, special=("<|endoftext|>",)):
    """A byte-level BPE (GPT-2's recipe) trained with `tokenizers` on BPE_TEXT, saved as folder/tokenizer.json."""
    from tokenizers import Tokenizer as HF, decoders, models, pre_tokenizers, trainers

    tok = HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(BPE_TEXT, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(special), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def test_hugging_face_tokenizer_json(tmp_path, user_corpus):
    path = train_bpe(tmp_path / "bpe")
    tok = Tokenizer.load(str(path.parent))  # a folder holding tokenizer.json, or the file itself
    assert tok.kind == "huggingface" and tok.vocab_size == 300
    assert tok.eos_id == tok.backend.token_to_id("<|endoftext|>") == tok.bos_id
    text = BPE_TEXT[2]
    assert tok.encode(text) == tok.backend.encode(text, add_special_tokens=False).ids
    assert tok.decode(tok.encode(text)) == text
    cfg = DataConfig(corpus=str(user_corpus), tokenizer=str(path), cache_dir=str(tmp_path / "cache"), seq_len=2,
                     val_fraction=0.2)
    out = prepare_tokens(cfg)
    expected = [t for doc in iter_documents(str(user_corpus)) for t in tok.encode(doc) + [tok.eos_id]]
    meta = json.loads((out / "meta.json").read_text())
    assert np.fromfile(out / "tokens.bin", dtype=np.uint16).tolist() == expected and meta["dtype"] == "uint16"
    # a tokenizer_config.json beside it names the EOS token
    (path.parent / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "Ġfox"}}))
    assert Tokenizer.load(str(path)).eos_id == tok.backend.token_to_id("Ġfox")


def word_tokenizer(folder, num_words, eos="</s>"):
    """A WordLevel tokenizer.json over the words w0 .. w{num_words-1} (+ eos), split at whitespace."""
    from tokenizers import Tokenizer as HF, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(num_words)} | {"<unk>": num_words}
    tok = HF(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if eos:
        tok.add_special_tokens([eos])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def test_token_file_is_uint32_past_65536_tokens(tmp_path):
    tokenizer = word_tokenizer(tmp_path / "words", 70_000)
    corpus = tmp_path / "docs.jsonl"
    docs = [" ".join(f"w{(i * 7919 + j * 104729) % 70_000}" for j in range(40)) for i in range(20)]
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = DataConfig(corpus=str(corpus), tokenizer=str(tokenizer), cache_dir=str(tmp_path / "cache"), seq_len=8)
    out = prepare_tokens(cfg)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_002 and meta["eos_id"] == 70_001
    expected = [t for d in docs for t in [int(w[1:]) for w in d.split()] + [70_001]]
    assert max(expected) > 65_535
    data = TokenData(out, seq_len=8, val_fraction=0.02)
    assert data.tokens.dtype == np.uint32 and data.tokens.tolist() == expected
    inputs, targets = data.read(0, np.arange(3))
    assert inputs.flatten().tolist()[:8] == expected[:8] and targets[0].tolist() == expected[1:9]


def test_model_config_takes_the_tokenizers_vocabulary(tmp_path):
    from curvtrain.models.data import model_config

    bpe = DataConfig(tokenizer=str(train_bpe(tmp_path / "bpe")))
    assert model_config("tiny", bpe).vocab_size == 300
    assert model_config("tiny", DataConfig()).vocab_size == 32000
    assert model_config("tiny", bpe, vocab_size=320).vocab_size == 320  # padded
    with pytest.raises(ValueError, match=r"model.vocab_size=1000 is smaller than the vocabulary of "
                                         r"data.tokenizer='mistral-v1' \(32000 tokens\)"):
        model_config("tiny", DataConfig(), vocab_size=1000)


def test_a_tokenizer_without_eos_is_refused_before_anything_is_written(tmp_path, user_corpus):
    no_eos = word_tokenizer(tmp_path / "words", 100, eos=None)
    cfg = DataConfig(corpus=str(user_corpus), tokenizer=str(no_eos), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"data.tokenizer='.*words/tokenizer.json' has no end-of-sequence token"):
        prepare_tokens(cfg)
    assert not (tmp_path / "cache").exists()


# ---- corpus readers ------------------------------------------------------------------------------

DOCS = ["First document.", "Second one,\nover two lines.", "Third: Ünïcödé."]


def test_parquet_arrow_and_compressed_jsonl_give_the_same_documents(tmp_path):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    table = pa.table({"id": list(range(len(DOCS))), "content": DOCS})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=2)
    with pa.OSFile(str(tmp_path / "b.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:  # datasets' format
        w.write_table(table, max_chunksize=1)
    with pa.OSFile(str(tmp_path / "c.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:  # Arrow's file format
        w.write_table(table)
    lines = "".join(json.dumps({"content": d}) + "\n" for d in DOCS).encode()
    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(lines))
    half = len(lines) // 2  # two zstd frames, as concatenating tools write them
    (tmp_path / "e.jsonl.zst").write_bytes(b"".join(zstandard.ZstdCompressor().compress(part)
                                                    for part in (lines[:half], lines[half:])))
    opts = ReadOptions(text_column="content")
    for name in ("a.parquet", "b.arrow", "c.arrow", "d.jsonl.gz", "e.jsonl.zst"):
        assert list(iter_documents(str(tmp_path / name), opts)) == DOCS, name
    assert list(iter_documents(str(tmp_path), opts)) == DOCS * 5  # a folder, in sorted path order
    with pytest.raises(ValueError, match=r"a.parquet has no column 'text' \(its columns: \['id', 'content'\]\)"):
        list(iter_documents(str(tmp_path / "a.parquet")))
    with pytest.raises(ValueError, match=r"d.jsonl.gz, line 1: expected a JSON object with a string \"text\" field"):
        list(iter_documents(str(tmp_path / "d.jsonl.gz")))
    with pytest.raises(ValueError, match="column 'id' holds int64, not strings"):
        list(iter_documents(str(tmp_path / "a.parquet"), ReadOptions(text_column="id")))
    cfg = DataConfig(corpus=str(tmp_path / "a.parquet"), text_column="content", cache_dir=str(tmp_path / "cache"),
                     seq_len=2, val_fraction=0.2)
    tok = Tokenizer.load()
    expected = [t for d in DOCS for t in tok.encode(d) + [tok.eos_id]]
    assert np.fromfile(prepare_tokens(cfg) / "tokens.bin", dtype=np.uint16).tolist() == expected


def save_to_disk(folder, splits: dict[str, list[str]]):
    """A `datasets` DatasetDict.save_to_disk folder: through `datasets` where installed, else its layout
    (dataset_dict.json; per split state.json, dataset_info.json and Arrow stream files) written with pyarrow."""
    try:
        import datasets
    except ImportError:
        import pyarrow as pa

        folder.mkdir()
        (folder / "dataset_dict.json").write_text(json.dumps({"splits": list(splits)}))
        for split, texts in splits.items():
            (folder / split).mkdir()
            table = pa.table({"text": texts})
            names = [f"data-{i:05d}-of-00002.arrow" for i in range(2)]
            for name, part in zip(names, (table.slice(0, 1), table.slice(1))):
                with pa.OSFile(str(folder / split / name), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
                    w.write_table(part)
            (folder / split / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names]}))
            (folder / split / "dataset_info.json").write_text("{}")
        return folder
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in splits.items()}).save_to_disk(str(folder))
    return folder


def test_datasets_save_to_disk_folder(tmp_path):
    folder = save_to_disk(tmp_path / "ds", {"train": DOCS, "test": ["held out"]})
    assert list(iter_documents(str(folder))) == DOCS  # a DatasetDict: its train split
    assert list(iter_documents(str(folder / "test"))) == ["held out"]
    (folder / "dataset_dict.json").write_text(json.dumps({"splits": ["test"]}))
    with pytest.raises(ValueError, match=r"DatasetDict without a 'train' split \(it has \['test'\]\)"):
        iter_documents(str(folder))


def test_long_documents_stream_in_bounded_pieces(tmp_path):
    from curvtrain.models.data.corpus import iter_pieces

    lines = [f"line {i} " + "word " * (i % 13) for i in range(500)]
    text = "\n".join(lines) + "\n" + "x" * 250  # the last line alone is longer than a piece
    (tmp_path / "long.txt").write_text(text)
    (tmp_path / "short.txt").write_text("short one")
    pieces = list(iter_pieces(str(tmp_path), ReadOptions(max_chars=100)))
    assert all(len(p) <= 100 for p, _ in pieces)
    assert "".join(p for p, _ in pieces[:-1]) == text and pieces[-1] == ("short one", True)
    assert [last for _, last in pieces].count(True) == 2
    assert all(p.endswith("\n") for p, _ in pieces[:-5])  # cut at line boundaries where a line fits
    # tokens are written piece by piece: the same file through a small batch size holds the same tokens
    cfg = DataConfig(corpus=str(tmp_path), cache_dir=str(tmp_path / "cache"), seq_len=4)
    tok = Tokenizer.load()
    expected = [t for doc in iter_documents(str(tmp_path)) for t in tok.encode(doc) + [tok.eos_id]]
    assert np.fromfile(prepare_tokens(cfg) / "tokens.bin", dtype=np.uint16).tolist() == expected


def test_an_undecodable_file_is_named_or_skipped(tmp_path):
    (tmp_path / "a.txt").write_text("Readable text.")
    (tmp_path / "b.txt").write_bytes(b"caf\xe9 au lait, en latin-1")
    with pytest.raises(ValueError, match=r"corpus file .*b.txt: not utf-8 text \(byte 0xe9 .*set data.encoding .* "
                                         r"or data.skip_undecodable=true"):
        list(iter_documents(str(tmp_path)))
    assert list(iter_documents(str(tmp_path), ReadOptions(encoding="latin-1")))[1] == "café au lait, en latin-1"
    with pytest.warns(SkippedFileWarning, match=r"skipping corpus file .*b.txt: not utf-8 text"):
        assert list(iter_documents(str(tmp_path), ReadOptions(skip_undecodable=True))) == ["Readable text."]
    with pytest.raises(ValueError, match="encoding 'klingon' is not a text encoding"):
        DataConfig(encoding="klingon")
    (tmp_path / "b.txt").unlink()
    (tmp_path / "c.jsonl.gz").write_bytes(b"\x1f\x8b\x08 truncated")
    with pytest.raises(ValueError, match=r"corpus file .*c.jsonl.gz cannot be read"):
        list(iter_documents(str(tmp_path)))
    (tmp_path / "c.jsonl.gz").unlink()
    (tmp_path / "d.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd truncated")
    with pytest.raises(ValueError, match=r"corpus file .*d.jsonl.zst cannot be read"):
        list(iter_documents(str(tmp_path)))


# ---- a tokenizer trained on the corpus -------------------------------------------------------------


def test_a_tokenizer_trained_on_the_corpus_once(tmp_path):
    from curvtrain.models.data import load_tokenizer, model_config

    cfg = DataConfig(corpus="lee", tokenizer="train:1000", cache_dir=str(tmp_path / "cache"), seq_len=16)
    tok = load_tokenizer(cfg)
    assert tok.kind == "sentencepiece" and tok.vocab_size == 1000 and (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.path.parent.parent == tmp_path / "cache" and tok.path.name == "tokenizer.model"
    doc = next(iter_documents("lee"))
    assert tok.decode(tok.encode(doc)) == doc and len(tok.encode(doc)) < len(doc) / 2.5  # merges learned
    mtime = tok.path.stat().st_mtime_ns
    assert load_tokenizer(cfg).path == tok.path and tok.path.stat().st_mtime_ns == mtime  # trained once
    tokens = np.fromfile(prepare_tokens(cfg) / "tokens.bin", dtype=np.uint16)
    assert tokens.max() < 1000 and model_config("tiny", cfg).vocab_size == 1000
    other = load_tokenizer(DataConfig(corpus="lee", tokenizer="train:800", cache_dir=str(tmp_path / "cache")))
    assert other.vocab_size == 800 and other.path != tok.path
    for bad in ("train:", "train:abc", "train:100"):
        with pytest.raises(ValueError, match=r"train:N needs a vocabulary size N ≥ 320"):
            DataConfig(tokenizer=bad)
