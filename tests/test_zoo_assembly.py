"""A zoo name's assembly (tinymed.models.zoo.assemble) when several processes ask for it at once — `serve` and
`evaluate` started together on a fresh machine: one assembles, the others wait and reuse its folder."""

from __future__ import annotations

import threading
import time

from tinymed.models import zoo


def test_concurrent_callers_assemble_once_and_share_one_complete_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYMED_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "weights"
    weights.mkdir()
    for file in zoo.SHIPPED_FILES:
        (weights / file).write_text(file)
    monkeypatch.setitem(zoo.ZOO, "fake-med", zoo.ZooModel("fake-med", weights))
    writes = []

    def slow_write(entry, folder):
        writes.append(entry.name)
        time.sleep(0.5)  # the other callers arrive while this one is mid-write
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_text("weights")

    monkeypatch.setattr(zoo, "_write_assembled", slow_write)
    folders, errors = [], []

    def ask():
        try:
            folders.append(zoo.assemble("fake-med"))
        except Exception as exc:  # noqa: BLE001 — reported by the assertion below
            errors.append(exc)

    callers = [threading.Thread(target=ask) for _ in range(3)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert errors == [] and writes == ["fake-med"]
    assert len(set(folders)) == 1 and folders[0] == zoo.assembled_folder("fake-med")
    assert sorted(p.name for p in folders[0].iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in folders[0].parent.iterdir() if p.name.startswith(".tmp")] == []
