"""Stage cache keys: the same configuration names the same cached corpus and teacher, release after release."""
import json

from raykd.config import DataConfig, ModelShape, StudyConfig, TeacherConfig, TrainConfig
from raykd.stages import teacher_key


def test_the_teacher_key_of_a_configuration_does_not_change(tmp_path):
    """A changed key would orphan every user's cached teacher: the hashed content is pinned here
    (566f38b's value was e97bf51c7927ded0; the key has included train.dropout since 4f93885,
    because a teacher trained with other dropout is another teacher)."""
    corpus = tmp_path / "data-0123456789abcdef"
    (corpus / "tokenizer").mkdir(parents=True)
    empty = {"num_examples": 0, "num_tokens": 0, "shards": []}
    (corpus / "meta.json").write_text(json.dumps({
        "seq_len": 64, "vocab_size": 2048, "special_ids": {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4},
        "tokenizer": "tokenizer", "params": {"source": "synthetic", "seed": 0, "num_documents": 100},
        "splits": {"train": empty, "validation": empty}}))
    config = StudyConfig(teacher=TeacherConfig(shape=ModelShape(3, 96, 3, 384), budget=5e12, budget_unit="flops",
                                               lr=2e-3),
                         train=TrainConfig(per_worker_batch=16, workers=2), data=DataConfig(mask_prob=0.2, seed=7))
    assert teacher_key(config, corpus / "meta.json") == "d998eb87ee155ec6"
