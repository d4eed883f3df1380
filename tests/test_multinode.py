"""The sweep on a real multi-node Ray cluster with S3 storage, all on this machine (loopback only).

A head node with no CPUs (it runs no trial, as on AWS), worker nodes that each
have their own cache, storage on moto's S3 server, and a driver whose cache
and --out live on a tmpfs mounted in the driver's own mount namespace: no
trial process can open anything there, as no GPU node can open a head node's
disk. Every study here is the smoke preset reduced to two strategies run one
after the other, a longer pretraining (so a fault can land mid-run) and one
task; they share the storage, so the teacher is pretrained once.

1. `test_the_smoke_study_runs_on_the_cluster_from_the_storage`: the study
   completes with every row, in --out and in the storage.
2. `test_a_killed_driver_resumes_from_the_storage`: the driver is killed
   after the first row (its tmpfs is lost with it, as a replaced head node's
   disk); `--resume` completes the study from the rows and checkpoints in
   the storage, without recomputing the finished row.
3. `test_a_lost_worker_node_costs_only_the_steps_since_the_checkpoint`: the
   worker node running a trial is killed after the trial's checkpoint reached
   the storage and before its last step; a new node joins, the trial resumes
   from the checkpoint, and its ledger matches the uninterrupted study's.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, free_port

OVERRIDES = ["strategies=[scratch, vanilla_kd]", "budgets=[1.5e11]", "repetitions=[4]", "teacher.budget=1e11",
             "train.checkpoint_every=10", "eval.tasks=[syn_topic]", "sweep.max_concurrent_trials=1",
             "controls=[]"]  # the controls are tested on one node (test_sweep); here they would only add time
WORKER_CPUS = 4
TIMEOUT = 1800  # per driver; ~250 s alone on 2 cores, several times that on a shared machine

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare(1) to give the driver a disk no trial can read (a private tmpfs)")


@pytest.fixture(scope="module")
def s3_uri(s3_server):
    """The storage of every study here, with the S3 server's variables set for the module (nodes inherit them)."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in s3_server.items():
            patch.setenv(name, value)
        yield "s3://raykd-test/multinode"


class RayCluster:
    """`ray.cluster_utils.Cluster`: a head with 0 CPUs and worker nodes, each with its own RAYKD_CACHE."""

    def __init__(self, root: Path, patch: pytest.MonkeyPatch):
        from ray.cluster_utils import Cluster

        self.root, self.patch = root, patch
        self.caches = []
        (root / "ray" / "ray").mkdir(parents=True)
        patch.setenv("RAY_TMPDIR", str(root / "ray"))  # the address file stays ours, not /tmp/ray's
        # A driver given 127.0.0.1 would otherwise swap in the machine's own address (Ray's
        # resolve_ip_for_localhost), which these nodes, bound to loopback, do not listen on.
        patch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False,
            "dashboard_port": free_port(), "dashboard_agent_listen_port": free_port(),
            "temp_dir": str(root / "ray")})

    def add_worker(self):
        cache = self.root / f"node-cache-{len(self.caches)}"
        self.caches.append(cache)
        self.patch.setenv("RAYKD_CACHE", str(cache))  # inherited by the node's raylet and its workers
        return self.cluster.add_node(num_cpus=WORKER_CPUS, node_ip_address="127.0.0.1",
                                     object_store_memory=200 * 1024 * 1024)

    def shutdown(self):
        self.cluster.shutdown()


@pytest.fixture(scope="module")
def cluster(s3_uri, tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster", numbered=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("RAY_ADDRESS", raising=False)
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        ray_cluster = RayCluster(root, patch)
        ray_cluster.worker = ray_cluster.add_worker()
        yield ray_cluster
        ray_cluster.shutdown()


class Driver:
    """`grid.py` in a mount namespace of its own, its cache and --out on a tmpfs only it sees.

    The tmpfs goes with the driver; after a clean exit `out` is copied to `kept` for the test to read.
    """

    def __init__(self, cluster, storage, private: Path, kept: Path, *extra):
        private.mkdir(parents=True, exist_ok=True)
        self.private, self.kept = private, kept
        grid = [sys.executable, str(REPO / "sweeps" / "grid.py"), "--preset", "smoke", "--out", f"{private}/out",
                "--cache-dir", f"{private}/cache", "--storage", storage, *extra, *OVERRIDES]
        script = ('mount -t tmpfs -o size=1g raykd-driver "$1" && shift 2 && "$@"; status=$?; '
                  '[ $status -eq 0 ] && cp -r "$0/out" "$KEPT"; exit $status')
        env = {**os.environ, "RAY_ADDRESS": cluster.cluster.address, "KEPT": str(kept)}
        env.pop("RAYKD_CACHE", None)
        self.log_path = private.parent / f"driver-{kept.name}.log"
        self.log = open(self.log_path, "w")
        self.started = time.time()
        self.process = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script, str(private), str(private), "--", *grid],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def running(self) -> bool:
        return self.process.poll() is None

    def wait(self) -> float:
        try:
            self.process.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        finally:
            self.log.close()
        assert self.process.returncode == 0, self.log_path.read_text()[-4000:]
        assert not any(self.private.iterdir()), "the driver's private disk leaked into the shared filesystem"
        return time.time() - self.started

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.log.close()


class Storage:
    """Reads of the S3 storage, as the test sees it."""

    def __init__(self, uri):
        from raykd import storage

        self.uri, self.storage = uri, storage

    def study_keys(self) -> set:
        from pyarrow import fs as pafs

        fs, path = self.storage.filesystem(self.storage.join(self.uri, "studies"))
        return {info.base_name for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))}

    def rows(self, key) -> dict:
        """{trial_id: (row, last modified)} of a study's finished rows."""
        fs, _ = self.storage.filesystem(self.uri)
        found = {}
        for uri in self.storage.list_files(self.storage.join(self.uri, "studies", key, "trials"), ".json"):
            info = fs.get_file_info(self.storage.filesystem(uri)[1])
            row = json.loads(self.storage.read_text(uri))
            found[row["trial_id"]] = (row, info.mtime_ns)
        return found

    def checkpoints(self, key, trial_id) -> dict:
        """{checkpoint folder: steps in its state.json} of a trial's Train run."""
        from pyarrow import fs as pafs

        run = self.storage.join(self.uri, f"{key}-{trial_id}")
        fs, path = self.storage.filesystem(run)
        found = {}
        for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
            if info.base_name.startswith("checkpoint_"):
                try:
                    state = json.loads(self.storage.read_text(self.storage.join(run, info.base_name, "state.json")))
                except (OSError, ValueError):  # being written or deleted
                    continue
                found[info.base_name] = state["ledger"]["steps"]
        return found


def committed_step(store, key, trial_id):
    """The step of the trial's latest checkpoint that Ray Train has recorded in its run's snapshot in the
    storage: what a restarted trial restores (a checkpoint folder alone may not be recorded yet)."""
    run = store.storage.join(store.uri, f"{key}-{trial_id}")
    try:
        snapshot = json.loads(store.storage.read_text(store.storage.join(run, "checkpoint_manager_snapshot.json")))
    except (OSError, ValueError):
        return None
    latest = snapshot.get("latest_checkpoint_result")
    return latest and latest["metrics"]["step"]


def wait_for(condition, what, driver, timeout=TIMEOUT, poll=0.3):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        assert driver.running(), f"the driver ended while waiting for {what}: " + driver.log_path.read_text()[-4000:]
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def new_study_key(store, before, driver) -> str:
    (key,) = wait_for(lambda: store.study_keys() - before, "the study's key in the storage", driver)
    return key


@pytest.fixture(scope="module")
def clean_study(cluster, s3_uri, tmp_path_factory):
    """The reference: the study uninterrupted on the cluster."""
    store, base = Storage(s3_uri), tmp_path_factory.mktemp("clean")
    before = store.study_keys()
    driver = Driver(cluster, s3_uri, base / "private", base / "out")
    wall = driver.wait()
    (key,) = store.study_keys() - before
    print(f"\nclean study on the cluster with S3 storage: {wall:.0f} s")
    return {"out": base / "out", "key": key, "rows": store.rows(key), "wall": wall}


def test_the_smoke_study_runs_on_the_cluster_from_the_storage(clean_study, cluster, s3_uri):
    from raykd.config import load_config

    results = pd.read_parquet(clean_study["out"] / "results.parquet")
    strategies = load_config("smoke", overrides=OVERRIDES).strategies
    assert sorted(results.strategy) == sorted(strategies)
    assert set(results.trial_id) == set(clean_study["rows"])
    for row in results.itertuples():
        assert row.checkpoint.startswith(f"{s3_uri}/") and row.steps > 0 and row.syn_topic >= 0
    # The teacher and the corpus were read by the worker node from the storage, through its own cache.
    copies = [p.name for p in cluster.caches[0].glob("from-storage/*")]
    assert any(name.endswith("-model") for name in copies) and any(name.endswith("-tokenizer") for name in copies)


def test_a_killed_driver_resumes_from_the_storage(clean_study, cluster, s3_uri, tmp_path):
    store = Storage(s3_uri)
    before = store.study_keys()
    first = Driver(cluster, s3_uri, tmp_path / "private", tmp_path / "killed")
    key = new_study_key(store, before, first)
    wait_for(lambda: store.rows(key), "the first row", first)
    first.kill()
    at_kill = store.rows(key)
    assert len(at_kill) == 1

    resumed = Driver(cluster, s3_uri, tmp_path / "private", tmp_path / "out", "--resume")
    wall = resumed.wait()
    print(f"\nresumed study after the driver was killed: {wall:.0f} s")
    rows = store.rows(key)
    assert set(rows) == set(clean_study["rows"])
    for trial, (row, mtime) in at_kill.items():
        assert rows[trial] == (row, mtime), f"{trial} was recomputed"
    results = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert set(results.trial_id) == set(rows)


def test_a_lost_worker_node_costs_only_the_steps_since_the_checkpoint(clean_study, cluster, s3_uri, tmp_path):
    store = Storage(s3_uri)
    before = store.study_keys()
    driver = Driver(cluster, s3_uri, tmp_path / "private", tmp_path / "out")
    key = new_study_key(store, before, driver)
    finished = wait_for(lambda: store.rows(key), "the first row", driver)
    (done,) = finished
    (victim,) = set(clean_study["rows"]) - {done}
    at_kill = wait_for(lambda: committed_step(store, key, victim), f"a recorded checkpoint of {victim}", driver,
                       poll=0.1)
    seen = store.checkpoints(key, victim)
    cluster.cluster.remove_node(cluster.worker, allow_graceful=False)  # the spot reclaim
    done_checkpoints = store.checkpoints(key, done)
    cluster.worker = cluster.add_worker()

    after_kill = {}
    while driver.running():
        for name, steps in store.checkpoints(key, victim).items():
            if name not in seen:
                after_kill.setdefault(name, steps)
        time.sleep(0.3)
    wall = driver.wait()
    print(f"\nstudy with a worker node lost mid-trial: {wall:.0f} s; {victim} killed at checkpoint step {at_kill}")

    rows = store.rows(key)
    row, clean = rows[victim][0], clean_study["rows"][victim][0]
    assert at_kill < row["steps"], "the node was killed after the trial's last step"
    # Resumed from a checkpoint at or past the recorded one, not restarted: every checkpoint written
    # after the kill is past it (a restart would write step checkpoint_every again).
    assert after_kill and min(after_kill.values()) > at_kill, after_kill
    assert abs(row["steps"] - clean["steps"]) <= 1
    step_flops = clean["flops"] / clean["steps"]
    assert abs(row["flops"] - clean["flops"]) <= step_flops
    assert abs(row["tokens"] - clean["tokens"]) <= clean["tokens"] / clean["steps"]
    # The row finished before the kill was neither lost nor recomputed.
    assert rows[done] == finished[done]
    assert store.checkpoints(key, done) == done_checkpoints
    assert set(pd.read_parquet(tmp_path / "out" / "results.parquet").trial_id) == {done, victim}
