"""Exactly once under DDP: 2 processes (gloo) streaming one shard folder see disjoint samples, each sample
at most once per epoch, equal counts per process, a new order every epoch, the same order for the same seed.

The test launches this file as a script once per rank:
    python tests/test_shards_ddp.py RANK WORLD PORT SHARDS OUT.json
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

BATCH, EPOCHS = 2, 2


def _rank_main(rank: int, world: int, port: int, folder: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    from remedis.data.streaming import ShardDataset, ShardLoader

    torch.set_num_threads(1)

    class Groups(ShardDataset):
        def item(self, sample, epoch):
            return int(sample["group"]), epoch

    def make(seed: int) -> ShardLoader:
        return ShardLoader(Groups(folder, seed=seed), BATCH, drop_last=True, collate_fn=lambda batch: batch)

    def run(loader: ShardLoader) -> list[list[list[int]]]:
        return [[[g, e] for batch in loader for g, e in batch] for _ in range(EPOCHS)]

    early = make(0)  # built before the process group exists, as a Lightning job builds it: detected later
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    first = run(early)
    again = run(make(0))
    other = run(make(1))
    Path(out).write_text(json.dumps({"first": first, "again": again, "other": other, "batches": len(early)}))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_stream_disjoint_samples_once_per_epoch(tmp_path):
    from remedis.data.manifest import read_manifest
    from remedis.data.preprocess import Preprocessing
    from remedis.data.shards import write_shards
    from remedis.data.synthetic import SyntheticSpec, generate_synthetic

    manifest = generate_synthetic(tmp_path / "synth", SyntheticSpec(patients_per_site=4, image_size=20), seed=0)
    shards = write_shards(read_manifest(manifest).records, Preprocessing(16), tmp_path / "shards", num_workers=2)
    n, world, port = len(shards), 2, _free_port()
    procs = [subprocess.Popen([sys.executable, __file__, str(rank), str(world), str(port), str(shards.folder),
                               str(tmp_path / f"rank{rank}.json")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(world)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(world)]

    per_rank = (n // world) // BATCH * BATCH
    assert all(r["batches"] == per_rank // BATCH for r in ranks)
    for run in ("first", "again", "other"):
        for epoch in range(EPOCHS):
            seen = [[g for g, e in r[run][epoch]] for r in ranks]
            assert all(e == epoch for r in ranks for _, e in r[run][epoch])  # the items' epoch is litdata's, 0-based
            assert [len(s) for s in seen] == [per_rank] * world  # equal counts per process
            assert all(len(set(s)) == len(s) for s in seen)  # no sample twice in an epoch
            assert not set(seen[0]) & set(seen[1])  # processes disjoint
            assert set(seen[0]) | set(seen[1]) <= set(range(n))
    for r in ranks:
        assert r["first"][0] != r["first"][1]  # reshuffled every epoch
        assert r["first"] == r["again"]  # the same for the same seed
        assert r["first"] != r["other"]


if __name__ == "__main__":
    _rank_main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
