"""Object storage: a real S3-compatible server (moto's, started on 127.0.0.1 on a free port) serves
JSONL, JSONL.gz and Parquet; streaming them through s3:// gives the same token ids as the local files,
resumes exactly, and a training run on s3:// data matches the same run on local data."""

import json
import socket

import pytest
from data_layouts import ROWS, write_layouts
from helpers import ROOT, job_config, tokenizer

from posttrain.config import SourceConfig
from posttrain.data.samples import load_samples
from posttrain.data.sources import SourceStream
from posttrain.metrics.jsonl import read_jsonl
from posttrain.recipes import sft

moto_server = pytest.importorskip("moto.server")
pytest.importorskip("s3fs")
BUCKET = "posttrain-data"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """(storage_options, local folder mirrored under s3://BUCKET/) for a fresh moto server."""
    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    creds = dict(aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1")
    client = boto3.client("s3", endpoint_url=url, **creds)
    client.create_bucket(Bucket=BUCKET)
    local = write_layouts(tmp_path_factory.mktemp("s3src"))
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        client.upload_file(str(path), BUCKET, str(path.relative_to(local)))
    options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": url, "region_name": "us-east-1"},
    }
    yield options, local
    server.stop()


def _ids(path, options=None):
    src = SourceConfig(path=str(path), format="chat", storage_options=options or {})
    samples, skips = load_samples(src, tokenizer(), max_len=256, overlong="truncate")
    assert skips == {}
    return [s.input_ids for s in samples]


@pytest.mark.parametrize(
    "name", ["all.jsonl", "all.jsonl.gz", "all.parquet", "shards", "shards/part-*", "hf"]
)
def test_s3_streams_the_same_token_ids_as_local_files(s3, name):
    options, local = s3
    remote = _ids(f"s3://{BUCKET}/{name}", options)
    assert len(remote) == len(ROWS) and remote == _ids(local / name)


def test_s3_stream_resumes_mid_file(s3):
    options, _ = s3
    src = SourceConfig(path=f"s3://{BUCKET}/shards", format="chat", storage_options=options)
    straight = SourceStream(src, seed=1, shuffle=True, window=8)
    locs = [straight.next_record()[0] for _ in range(60)]
    first = SourceStream(src, seed=1, shuffle=True, window=8)
    for _ in range(37):
        first.next_record()
    resumed = SourceStream(src, seed=1, shuffle=True, window=8)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert [resumed.next_record()[0] for _ in range(23)] == locs[37:]
    assert locs[0].startswith(f"s3://{BUCKET}/shards/")


def test_training_on_s3_equals_training_on_local_files(s3, tmp_path):
    options, local = s3
    runs = {}
    for where, train in {
        "local": {"path": str(local / "all.parquet"), "format": "chat"},
        "s3": {"path": f"s3://{BUCKET}/all.parquet", "format": "chat", "storage_options": options},
    }.items():
        cfg = job_config(
            tmp_path / where,
            ROOT / "unused.jsonl",
            data={"train": train, "max_tokens_per_pack": 96},
            training={"max_steps": 3},
        )
        sft.train(cfg)
        runs[where] = read_jsonl(tmp_path / where / "out/metrics.jsonl")
    assert [r["loss"] for r in runs["s3"]] == [r["loss"] for r in runs["local"]]
    assert [r["num_tokens"] for r in runs["s3"]] == [r["num_tokens"] for r in runs["local"]]
    assert sum(r["samples/all"] for r in runs["s3"]) > 0
