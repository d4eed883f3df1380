"""Evaluation: GLUE metrics against hand computations, the task loader on
local folders in GLUE's formats, and fine-tuning a tiny real student."""
import json
import math
import os
import random

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

from raykd.evaluation import (
    TASKS,
    _encode,
    evaluate_student,
    finetune_task,
    load_student_classifier,
    load_task,
    task_score,
)

WORDS = [f"w{i}" for i in range(40)] + ["the", "a", "of", "and", "to"]
MARKER = "good"  # its presence decides the label of the learnable task
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# Tiny fine-tuning settings shared by the tests that train.
QUICK = dict(learning_rates=(3e-3,), batch_sizes=(16,), epochs=3, max_seq_len=32, seed=0, num_threads=1)


def _sentence(rng, marker=False):
    words = [rng.choice(WORDS) for _ in range(rng.randint(4, 9))]
    if marker:
        words.insert(rng.randrange(len(words) + 1), MARKER)
    return " ".join(words)


def _write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def _marker_rows(rng, n):
    rows = []
    for idx in range(n):
        label = rng.randint(0, 1)
        rows.append({"sentence": _sentence(rng, marker=bool(label)), "label": label, "idx": idx})
    return rows


def _pair_rows(rng, n, regression=False):
    rows = []
    for idx in range(n):
        first = _sentence(rng)
        if regression:
            second = _sentence(rng)
            overlap = len(set(first.split()) & set(second.split())) / len(set(first.split()))
            label = round(5.0 * overlap, 2)
        else:
            # Paraphrase stand-in: 1 when the marker sits in either sentence.
            label = rng.randint(0, 1)
            in_first = bool(label) and rng.random() < 0.5
            second = _sentence(rng, marker=bool(label) and not in_first)
            first = _sentence(rng, marker=in_first)
        rows.append({"sentence1": first, "sentence2": second, "label": label, "idx": idx})
    return rows


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A WordPiece tokenizer trained here, saved as a BERT-style fast tokenizer."""
    rng = random.Random(0)
    corpus = [_sentence(rng, marker=rng.random() < 0.3) for _ in range(300)]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=200, special_tokens=SPECIALS))
    assert [tokenizer.token_to_id(token) for token in SPECIALS] == [0, 1, 2, 3, 4]
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    folder = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    ).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, tokenizer_dir):
    """A tiny randomly initialised BERT masked LM in save_pretrained format."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=256,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    folder = tmp_path_factory.mktemp("student")
    BertForMaskedLM(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Task folders in GLUE row format, in each local file format the loader reads."""
    rng = random.Random(1)
    root = tmp_path_factory.mktemp("tasks")
    # Embedded-style JSONL tasks.
    _write_jsonl(root / "syn_cola" / "train.jsonl", _marker_rows(rng, 320))
    _write_jsonl(root / "syn_cola" / "validation.jsonl", _marker_rows(rng, 120))
    topic = [{"sentence": _sentence(rng), "label": i % 4} for i in range(40)]
    _write_jsonl(root / "syn_topic" / "train.jsonl", topic[:30])
    _write_jsonl(root / "syn_topic" / "validation.jsonl", topic[30:])
    # Real GLUE names: CoLA as hub-style Parquet shards, MRPC as JSONL, STS-B as CSV.
    os.makedirs(root / "cola")
    pd.DataFrame(_marker_rows(rng, 64)).to_parquet(root / "cola" / "train-00000-of-00001.parquet")
    pd.DataFrame(_marker_rows(rng, 32)).to_parquet(root / "cola" / "validation-00000-of-00001.parquet")
    _write_jsonl(root / "mrpc" / "train.jsonl", _pair_rows(rng, 320))
    _write_jsonl(root / "mrpc" / "validation.jsonl", _pair_rows(rng, 48))
    os.makedirs(root / "stsb")
    pd.DataFrame(_pair_rows(rng, 160, regression=True)).to_csv(root / "stsb" / "train.csv", index=False)
    pd.DataFrame(_pair_rows(rng, 48, regression=True)).to_csv(root / "stsb" / "validation.csv", index=False)
    # MNLI's dev split is the matched one.
    mnli = [{"premise": _sentence(rng), "hypothesis": _sentence(rng), "label": i % 3, "idx": i} for i in range(12)]
    _write_jsonl(root / "mnli" / "train.jsonl", mnli[:8])
    _write_jsonl(root / "mnli" / "validation_matched.jsonl", mnli[8:])
    return str(root)


# ---------------------------------------------------------------- metrics


def test_matthews_correlation_from_confusion_matrix():
    labels = [1, 1, 1, 0, 0, 0, 1, 0, 0, 0]
    predictions = [1, 0, 1, 0, 1, 0, 1, 0, 1, 0]
    tp, fn, fp, tn = 3, 1, 2, 4
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    for task in ("cola", "syn_cola"):
        score, details = task_score(task, predictions, labels)
        assert score == pytest.approx(100 * expected)
        assert details == {"matthews_correlation": pytest.approx(100 * expected)}


def test_f1_and_accuracy_are_averaged_for_paraphrase_tasks():
    labels = [1, 1, 0, 0, 1, 0]
    predictions = [1, 0, 0, 1, 1, 0]
    tp, fp, fn = 2, 1, 1
    f1 = 2 * tp / (2 * tp + fp + fn)
    accuracy = 4 / 6
    for task in ("mrpc", "qqp", "syn_para"):
        score, details = task_score(task, predictions, labels)
        assert details == {"f1": pytest.approx(100 * f1), "accuracy": pytest.approx(100 * accuracy)}
        assert score == pytest.approx(100 * (f1 + accuracy) / 2)


def test_pearson_and_spearman_are_averaged_for_similarity_tasks():
    predictions = [0.1, 0.4, 0.3, 0.9]
    labels = [0.0, 1.0, 2.0, 3.0]
    mean_p, mean_l = sum(predictions) / 4, sum(labels) / 4
    covariance = sum((p - mean_p) * (l - mean_l) for p, l in zip(predictions, labels))
    pearson = covariance / math.sqrt(
        sum((p - mean_p) ** 2 for p in predictions) * sum((l - mean_l) ** 2 for l in labels)
    )
    # Ranks (1, 3, 2, 4) against (1, 2, 3, 4): sum of squared rank differences 2.
    spearman = 1 - 6 * 2 / (4 * (4**2 - 1))
    for task in ("stsb", "syn_sts"):
        score, details = task_score(task, predictions, labels)
        assert details == {"pearson": pytest.approx(100 * pearson), "spearman": pytest.approx(100 * spearman)}
        assert score == pytest.approx(100 * (pearson + spearman) / 2)


def test_constant_predictions_count_as_no_correlation():
    score, details = task_score("stsb", [2.0, 2.0, 2.0], [1.0, 2.0, 4.0])
    assert score == 0.0 and details == {"pearson": 0.0, "spearman": 0.0}


def test_accuracy_for_the_other_tasks():
    for task in ("mnli", "qnli", "sst2", "rte", "syn_topic", "syn_nli"):
        score, details = task_score(task, [2, 1, 0, 1], [2, 1, 1, 0])
        assert score == pytest.approx(50.0) and details == {"accuracy": pytest.approx(50.0)}


def test_registry_covers_the_paper_and_embedded_tasks():
    expected = {"mnli", "qqp", "qnli", "sst2", "cola", "mrpc", "rte", "stsb"}
    expected |= {"syn_cola", "syn_topic", "syn_para", "syn_nli", "syn_sts"}
    assert set(TASKS) == expected
    assert TASKS["mnli"].dev_split == "validation_matched"
    assert TASKS["stsb"].num_labels == 1 and TASKS["mnli"].num_labels == 3


def test_unknown_task_is_named_with_the_known_ones(data_dir, student_dir, tokenizer_dir):
    for call in (
        lambda: task_score("colaa", [1], [1]),
        lambda: load_task("colaa", data_dir),
        lambda: finetune_task(student_dir, tokenizer_dir, "colaa", data_dir=data_dir),
        lambda: evaluate_student(student_dir, tokenizer_dir, ["cola", "colaa"], data_dir=data_dir),
    ):
        with pytest.raises(ValueError, match=r"'colaa'.*known tasks:.*mnli.*syn_sts"):
            call()


# ---------------------------------------------------------------- loading


def test_glue_named_tasks_load_from_local_folders(data_dir):
    cola, mrpc, stsb, mnli = (load_task(task, data_dir) for task in ("cola", "mrpc", "stsb", "mnli"))
    assert (len(cola["train"]), len(cola["validation"])) == (64, 32)
    assert {"sentence", "label"} <= set(cola["train"].column_names)
    assert {"sentence1", "sentence2", "label"} <= set(mrpc["validation"].column_names)
    assert isinstance(stsb["train"][0]["label"], float)
    assert len(mnli["validation"]) == 4  # read from validation_matched.jsonl


def test_missing_split_file_is_named(tmp_path):
    _write_jsonl(tmp_path / "rte" / "train.jsonl", _pair_rows(random.Random(0), 4))
    with pytest.raises(FileNotFoundError, match=r"rte/validation\.jsonl"):
        load_task("rte", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"syn_nli/train\.jsonl"):
        load_task("syn_nli", str(tmp_path))


def test_missing_text_column_is_named(tmp_path):
    rows = [{"sentence": "w1 w2", "label": 0}]  # RTE needs sentence1/sentence2
    _write_jsonl(tmp_path / "rte" / "train.jsonl", rows)
    _write_jsonl(tmp_path / "rte" / "validation.jsonl", rows)
    with pytest.raises(ValueError, match=r"'rte'.*'sentence1'"):
        load_task("rte", str(tmp_path))


def test_embedded_task_needs_a_data_dir():
    with pytest.raises(ValueError, match=r"'syn_cola'.*data_dir"):
        load_task("syn_cola")


def test_missing_student_checkpoint_fails_before_training(tmp_path, tokenizer_dir, data_dir):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        finetune_task(str(tmp_path / "nowhere"), tokenizer_dir, "cola", data_dir=data_dir)


def test_out_of_range_label_is_refused_before_training(tmp_path, student_dir, tokenizer_dir):
    rows = _marker_rows(random.Random(0), 8)
    _write_jsonl(tmp_path / "sst2" / "train.jsonl", rows)
    _write_jsonl(tmp_path / "sst2" / "validation.jsonl", [dict(row, label=-1) for row in rows])  # GLUE test-style
    with pytest.raises(ValueError, match=r"validation column 'label' holds -1"):
        finetune_task(student_dir, tokenizer_dir, "sst2", data_dir=str(tmp_path), **QUICK)


@pytest.mark.parametrize(
    "override, field",
    [
        ({"learning_rates": ()}, "learning_rates"),
        ({"learning_rates": ("1e-5",)}, "learning_rates"),
        ({"batch_sizes": (16, 0)}, "batch_sizes"),
        ({"epochs": 0}, "epochs"),
        ({"max_seq_len": 65}, "max_position_embeddings"),
        ({"max_train_examples": 0}, "max_train_examples"),
    ],
)
def test_bad_settings_are_named(override, field, student_dir, tokenizer_dir, data_dir):
    with pytest.raises(ValueError, match=field):
        finetune_task(student_dir, tokenizer_dir, "cola", data_dir=data_dir, **dict(QUICK, **override))


def test_pairs_are_encoded_with_segment_ids(tokenizer_dir, data_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    split = load_task("mrpc", data_dir)["validation"].select(range(3))
    examples, labels = _encode(tokenizer, split, ("sentence1", "sentence2"), 64, regression=False)
    for (ids, types), row in zip(examples, split):
        first = tokenizer(row["sentence1"], add_special_tokens=False)["input_ids"]
        second = tokenizer(row["sentence2"], add_special_tokens=False)["input_ids"]
        assert ids == [2, *first, 3, *second, 3]
        assert types == [0] * (len(first) + 2) + [1] * (len(second) + 1)
    assert labels.tolist() == split["label"][:]


# ---------------------------------------------------------------- fine-tuning


def test_encoder_weights_come_from_the_student(student_dir):
    saved = load_file(os.path.join(student_dir, "model.safetensors"))
    classifier = load_student_classifier(student_dir, num_labels=2)
    state = classifier.state_dict()
    encoder_keys = [key for key in saved if key.startswith("bert.")]
    assert len(encoder_keys) > 10
    for key in encoder_keys:
        assert torch.equal(state[key], saved[key]), key
    assert classifier.classifier.out_features == 2


def test_checkpoint_without_encoder_weights_is_refused(student_dir, tmp_path):
    saved = load_file(os.path.join(student_dir, "model.safetensors"))
    dropped = "bert.encoder.layer.1.output.dense.weight"
    del saved[dropped]
    for name in os.listdir(student_dir):
        if name != "model.safetensors":
            with open(os.path.join(student_dir, name), "rb") as src, open(tmp_path / name, "wb") as dst:
                dst.write(src.read())
    save_file(saved, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=dropped):
        load_student_classifier(str(tmp_path), num_labels=2)


def test_finetuning_learns_a_learnable_task_deterministically(student_dir, tokenizer_dir, data_dir):
    first = finetune_task(student_dir, tokenizer_dir, "syn_cola", data_dir=data_dir, **QUICK)
    second = finetune_task(student_dir, tokenizer_dir, "syn_cola", data_dir=data_dir, **QUICK)
    assert first["score"] > 60  # MCC; chance is 0
    assert first == second


def test_best_score_is_the_maximum_over_the_grid(student_dir, tokenizer_dir, data_dir):
    options = dict(QUICK, learning_rates=(1e-4, 3e-3), batch_sizes=(16, 32))
    result = finetune_task(student_dir, tokenizer_dir, "mrpc", data_dir=data_dir, **options)
    cells = [(cell["learning_rate"], cell["batch_size"]) for cell in result["grid"]]
    assert cells == [(1e-4, 16), (1e-4, 32), (3e-3, 16), (3e-3, 32)]
    every = [
        (score, cell, epoch) for cell in result["grid"] for epoch, score in enumerate(cell["epoch_scores"], 1)
    ]
    best_score, best_cell, best_epoch = max(every, key=lambda item: item[0])
    assert len({score for score, _, _ in every}) > 1  # the cells really differ
    assert result["score"] == best_score
    assert (result["best_lr"], result["best_batch_size"], result["best_epoch"]) == (
        best_cell["learning_rate"],
        best_cell["batch_size"],
        best_epoch,
    )
    assert result["details"] == best_cell["epoch_details"][best_epoch - 1]
    assert result["score"] == pytest.approx(sum(result["details"].values()) / 2)


def test_evaluate_student_averages_task_scores(student_dir, tokenizer_dir, data_dir):
    options = dict(QUICK, epochs=1, max_train_examples=64, max_eval_examples=24)
    result = evaluate_student(student_dir, tokenizer_dir, ["stsb", "syn_topic"], data_dir=data_dir, **options)
    scores = result["scores"]
    assert set(scores) == {"stsb", "syn_topic"}
    assert result["glue_score"] == pytest.approx((scores["stsb"] + scores["syn_topic"]) / 2)
    assert result["tasks"]["stsb"]["num_labels"] == 1
    assert result["tasks"]["syn_topic"]["num_labels"] == 4  # counted from the data
    assert result["tasks"]["stsb"]["num_train_examples"] == 64
    assert set(result["tasks"]["stsb"]["details"]) == {"pearson", "spearman"}


def test_evaluate_student_checks_every_task_file_first(student_dir, tokenizer_dir, data_dir):
    with pytest.raises(FileNotFoundError, match=r"rte/train\.jsonl"):
        evaluate_student(student_dir, tokenizer_dir, ["cola", "rte"], data_dir=data_dir, **QUICK)
