"""Nothing in the data tree runs code, through the real `pseudoseg` command: luigid neither loads a state file planted
in the shared output root nor listens beyond the loopback interface unless told to; a model checkpoint whose
unpickling would run code fails the stage with one line, and nothing of it runs."""

from __future__ import annotations

import os
import pickle
import socket
import time
from pathlib import Path

import pytest
import torch

from pseudoseg.models.adapters.segmenter import SAM_ARCHS, build_sam_arch
from tests.helpers import cli, cli_env, write_good_images
from tests.tasks.test_bad_inputs_cli import stage_files

pytestmark = pytest.mark.slow


class Payload:
    """Unpickling this runs ``os.system``: it touches ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a TCP socket listening on ``port`` (Linux /proc/net/tcp and tcp6)."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if int(hex_port, 16) != port or state != "0A":  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            if width == 8:
                found.add(socket.inet_ntop(socket.AF_INET, raw[::-1]))
            else:  # four little-endian 32-bit words
                found.add(socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))))
    return found


def luigid_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    env = cli_env(tmp_path)
    env["XDG_STATE_HOME"] = str(tmp_path / "state")
    return env, tmp_path / "state" / "pseudoseg" / "luigid"


def test_luigid_never_unpickles_state_from_the_output_root_and_listens_on_loopback_only(tmp_path):
    out, marker, port = tmp_path / "out", tmp_path / "ran", free_port()
    (out / ".luigid").mkdir(parents=True)
    (out / ".luigid" / "state.pickle").write_bytes(pickle.dumps(Payload(marker)))  # what a co-tenant could plant
    env, folder = luigid_env(tmp_path)
    luigid = cli(["luigid", "--out", str(out), "--port", str(port)], env)
    try:
        deadline = time.monotonic() + 60
        while not listening_addresses(port):
            assert luigid.poll() is None and time.monotonic() < deadline, "luigid did not start"
            time.sleep(0.2)
        assert listening_addresses(port) == {"127.0.0.1"}, "no authentication: loopback only unless --address"
    finally:
        luigid.terminate()
        text, _ = luigid.communicate(timeout=30)
    assert not marker.exists(), "the planted state ran"
    assert f"{out}/.luigid/state.pickle (kept there by an older pseudoseg) is not loaded; delete it" in text
    assert f"luigid on 127.0.0.1:{port}; state {folder}/state.pickle" in text
    assert (folder / "state.pickle").is_file(), "luigid keeps its state in the per-user folder"
    assert (folder.stat().st_mode & 0o777) == 0o700

    # a state file where someone else could have written it: refused before Luigi sees it, one line, exit 2
    (folder / "state.pickle").write_bytes(pickle.dumps(Payload(marker)))
    for extra, chmod, why in (
        ([], 0o777, f"its folder {folder} is writable by group or others (mode 0777)"),
        (["--state-path", str(out / "luigid.pickle")], 0o700, f"it is inside the output root {out}"),
    ):
        folder.chmod(chmod)
        (out / "luigid.pickle").write_bytes(pickle.dumps(Payload(marker)))
        proc = cli(["luigid", "--out", str(out), "--port", str(port), *extra], env)
        text, _ = proc.communicate(timeout=60)
        assert proc.returncode == 2, text
        (line,) = text.strip().splitlines()
        assert line.startswith("pseudoseg: luigid: refusing the state file") and why in line, line
    assert not marker.exists()


def test_a_model_checkpoint_that_would_run_code_fails_the_stage_with_one_line_and_a_fixed_one_heals(tmp_path):
    images, out, marker = tmp_path / "images", tmp_path / "out", tmp_path / "ran"
    write_good_images(images, 3)
    checkpoint = tmp_path / "sam.pth"
    torch.save({**build_sam_arch(SAM_ARCHS["tiny"], None).state_dict(), "extra": Payload(marker)}, checkpoint)
    settings = ["--set", "models.preset=real", "--set", "models.sam_arch=tiny",
                "--set", f"models.sam_checkpoint={checkpoint}", "--set", "models.device=cpu"]
    args = ["run", "SamEmbeddings", "--images", str(images), "--dataset", "ds", "--out", str(out), *settings]

    proc = cli(args, cli_env(tmp_path))
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, text
    assert not marker.exists(), "the checkpoint's payload ran"
    last = text.strip().splitlines()[-1]
    assert last.startswith(f"pseudoseg: failed, not retried: CheckpointError: SAM segmenter (`[models] "
                           f"sam_checkpoint`) checkpoint {checkpoint} is not a plain weights file"), last
    assert "GLOBAL posix.system" in last and "weights_only=False" not in last
    stats, rejects, _ = stage_files(out, "ingest")  # what ran before is intact: in = ok + rejected
    assert (stats["in_count"], stats["ok_count"], rejects) == (3, 3, [])
    assert not list((out / "ds" / "sam_embeddings").glob("*/_meta/*.done.json"))

    torch.save(build_sam_arch(SAM_ARCHS["tiny"], None).state_dict(), checkpoint)  # the fixed file: a state_dict
    proc = cli(args, cli_env(tmp_path))
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, text
    stats, rejects, _ = stage_files(out, "sam_embeddings")
    assert (stats["in_count"], stats["ok_count"], rejects) == (3, 3, [])
    assert not marker.exists()

