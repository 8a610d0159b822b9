from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engine.detokenize import IncrementalDetokenizer
from engine.tokenizer import ChatTokenizer

TEXTS = [
    "Plain ASCII, with spaces and punctuation!",
    "Emoji split over byte tokens: 🧑‍🚀🚀 and accents: déjà vu, naïve, Ærø",
    "日本語のテキストと中文字符 mixed with English",
    "  leading spaces, tabs\tand\nnewlines  ",
]


def chunks_of(decode, ids):
    detokenizer = IncrementalDetokenizer(decode)
    chunks = [detokenizer.add(i) for i in ids]
    chunks.append(detokenizer.flush())
    return [c for c in chunks if c], detokenizer.text


def test_byte_level_chunks_concatenate_to_the_decoded_text(smollm2_dir):
    tokenizer = ChatTokenizer(smollm2_dir)
    for text in TEXTS:
        ids = tokenizer._tokenizer.encode(text, add_special_tokens=False).ids
        chunks, joined = chunks_of(tokenizer.decode, ids)
        assert "".join(chunks) == joined == tokenizer.decode(ids) == text
        assert not any("\ufffd" in c for c in chunks), chunks
    # A multi-byte character spread over several tokens comes out whole, in one chunk.
    ids = tokenizer._tokenizer.encode("🚀", add_special_tokens=False).ids
    assert len(ids) > 1
    assert chunks_of(tokenizer.decode, ids)[0] == ["🚀"]


def test_sentencepiece_style_spaces_are_kept_between_chunks():
    # Llama-2's tokenizer decodes '▁word' pieces and strips the first one's space: decoding token by
    # token would glue words together.
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"], show_progress=False)
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, hello there"] * 20
    tokenizer.train_from_iterator(corpus, trainer)

    def decode(ids):
        return tokenizer.decode(list(ids))

    for text in ["the quick brown fox", "hello world, hello there dog"]:
        ids = tokenizer.encode(text).ids
        chunks, joined = chunks_of(decode, ids)
        assert joined == decode(ids) == text
        assert len(chunks) > 1


def test_flush_emits_a_character_cut_off_at_the_end(smollm2_dir):
    tokenizer = ChatTokenizer(smollm2_dir)
    ids = tokenizer._tokenizer.encode("ok 🚀", add_special_tokens=False).ids
    detokenizer = IncrementalDetokenizer(tokenizer.decode)
    emitted = [detokenizer.add(i) for i in ids[:-1]]  # stop before the emoji's last byte token
    held = detokenizer.flush()
    assert "".join(emitted) + held == tokenizer.decode(ids[:-1])
    assert detokenizer.text == tokenizer.decode(ids[:-1])
