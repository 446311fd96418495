"""The golden fixture is intact: exactly the files listed in its checksum file, with those
digests.  A regenerated, edited or partly copied fixture fails here rather than as a parity
failure somewhere in the engine tests."""

from __future__ import annotations

import hashlib

from tests import golden


def test_golden_fixture_matches_its_checksums() -> None:
    listed = {}
    for line in golden.SUMS.read_text(encoding="utf-8").splitlines():
        digest, name = line.split(maxsplit=1)
        listed[name] = digest
    present = sorted(p.relative_to(golden.ROOT).as_posix()
                     for p in golden.ROOT.rglob("*") if p.is_file())
    assert present == sorted(listed), "files added to or missing from the fixture"
    bad = [name for name, digest in listed.items()
           if hashlib.sha256((golden.ROOT / name).read_bytes()).hexdigest() != digest]
    assert not bad, f"fixture files differ from {golden.SUMS.name}: {bad}"


def test_every_clip_has_its_reference_outputs() -> None:
    clips = golden.expected()["clips"]
    assert sorted(clips) == sorted(p.name for p in golden.AUDIO.iterdir())
    for name, clip in clips.items():
        utterance = golden.expected_feats(clip["key"], "utterance")
        frame = golden.expected_feats(clip["key"], "frame")
        assert utterance.shape == (64,) and frame.shape == (clip["frames"], 64), name
