"""atomic_dir: writes land whole, and --overwrite only ever replaces folders taskvec wrote."""

import pytest

from taskvec.errors import TaskvecError
from taskvec.io import OUTPUT_MARKER, atomic_dir


def _write(path, overwrite=False):
    with atomic_dir(path, overwrite=overwrite) as tmp:
        (tmp / "a.json").write_text("{}")


def test_out_that_is_a_file_is_refused_and_kept(tmp_path):
    f = tmp_path / "afile"
    f.write_text("keep me")
    for ow in (False, True):
        with pytest.raises(TaskvecError, match="is a file, not a folder"):
            _write(f, overwrite=ow)
    assert f.read_text() == "keep me"


def test_overwrite_replaces_only_taskvec_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("TASKVEC_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(TaskvecError, match="not written by taskvec"):
        _write(model, overwrite=True)
    assert (model / "model.safetensors").read_bytes() == b"weights"
    out = tmp_path / "out"
    _write(out)
    assert (out / OUTPUT_MARKER).is_file()
    with pytest.raises(TaskvecError, match="already exists"):
        _write(out)
    _write(out, overwrite=True)  # its own folder: replaced
    cached = tmp_path / "cache" / "ntk" / "k"
    cached.mkdir(parents=True)
    (cached / "old.npy").write_bytes(b"x")
    _write(cached, overwrite=True)  # the cache is taskvec's by definition
    assert not (cached / "old.npy").exists()
    hub = tmp_path / "cache" / "hf" / "models--x"  # anything else under the cache is not taskvec's own
    hub.mkdir(parents=True)
    (hub / "snapshot.bin").write_bytes(b"x")
    with pytest.raises(TaskvecError, match="not written by taskvec"):
        _write(hub, overwrite=True)
    # a file added to (or changed in) a taskvec output since it was written is never lost
    (out / "my_notes.txt").write_text("mine")
    with pytest.raises(TaskvecError, match=r"files added or changed since taskvec wrote it \(my_notes.txt\)"):
        _write(out, overwrite=True)
    assert (out / "my_notes.txt").read_text() == "mine"
    (out / "my_notes.txt").unlink()
    _write(out, overwrite=True)
    legacy = tmp_path / "legacy"  # written by an older taskvec: plain-text marker, no listing
    legacy.mkdir()
    (legacy / OUTPUT_MARKER).write_text("written by taskvec\n")
    (legacy / "results.json").write_text("{}")
    _write(legacy, overwrite=True)
    assert not (legacy / "results.json").exists()


def test_overwrite_never_replaces_inputs_models_or_collections(tmp_path, monkeypatch):
    """The three ways QA destroyed data with --overwrite: --out = an input checkpoint (even one taskvec
    wrote, with its marker), --out = a folder holding a model, --out = a cached collection."""
    monkeypatch.setenv("TASKVEC_CACHE", str(tmp_path / "cache"))
    ck = tmp_path / "ck"
    with atomic_dir(ck) as tmp:  # a checkpoint taskvec wrote: it carries the output marker
        (tmp / "config.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(TaskvecError, match="is \\(or contains\\) the input"):
        _write_inputs(ck, inputs=[ck])
    with pytest.raises(TaskvecError, match="holds a model checkpoint"):
        _write(ck, overwrite=True)
    col = tmp_path / "cache" / "collections" / "c"
    (col / "runs" / "a").mkdir(parents=True)
    (col / "collection.json").write_text("{}")
    (col / "runs" / "a" / "run.json").write_text("{}")
    with pytest.raises(TaskvecError, match="is \\(or contains\\) the input"):
        _write_inputs(col, inputs=[col / "runs" / "a"])
    with pytest.raises(TaskvecError, match="holds a taskvec collection"):
        _write(col, overwrite=True)
    with pytest.raises(TaskvecError, match="not written by taskvec"):
        _write(col / "runs", overwrite=True)  # inside the cache, but collections are not derived caches
    assert (ck / "model.safetensors").read_bytes() == b"weights" and (col / "runs" / "a" / "run.json").is_file()
    with atomic_dir(ck, overwrite=True, internal=True) as tmp:  # the owner rebuilding its cache entry may
        (tmp / "config.json").write_text("{}")


def _write_inputs(path, inputs):
    with atomic_dir(path, overwrite=True, inputs=inputs) as tmp:
        (tmp / "a.json").write_text("{}")


def test_vectors_overwrite_refuses_its_own_input(tmp_path, capsys):
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from tiny import perturbed, save_hf, tiny_model

    from taskvec.cli import main

    base = tiny_model("gpt2", seed=0)
    b, f = save_hf(base, tmp_path / "b"), save_hf(perturbed(base, scale=1e-2, seed=1), tmp_path / "f")
    before = (f / "model.safetensors").read_bytes()
    assert main(["vectors", str(b), str(f), "--out", str(f), "--overwrite", "--basic", "--no-figures",
                 "--no-progress"]) == 2
    assert "never replaces an input" in capsys.readouterr().err
    assert (f / "model.safetensors").read_bytes() == before


def test_out_that_cannot_be_created_is_a_clear_error(tmp_path):
    f = tmp_path / "afile"
    f.write_text("keep me")
    with pytest.raises(TaskvecError, match="is a file, not a folder"):
        _write(f / "sub")
    assert f.read_text() == "keep me"


def test_killed_run_partials_are_swept_by_the_next_write(tmp_path):
    """A SIGKILLed run leaves `.out.partial-*` with its pid; the next write of `out` removes it (the
    owner is gone), while a folder whose owner still runs, or without an owner record, is kept."""
    import subprocess
    import sys

    from taskvec.io import PARTIAL_OWNER

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale, running, foreign = (tmp_path / f".out.partial-{x}" for x in ("a", "b", "c"))
    for d in (stale, running, foreign):
        d.mkdir()
        (d / "big.bin").write_bytes(b"x" * 10)
    (stale / PARTIAL_OWNER).write_text(dead.stdout)
    (running / PARTIAL_OWNER).write_text(f"{__import__('os').getppid()}\n")
    _write(tmp_path / "out")
    assert not stale.exists() and running.exists() and foreign.exists()
    assert not (tmp_path / "out" / PARTIAL_OWNER).exists()


def test_sigterm_removes_the_partial_output(tmp_path):
    """`kill`/`timeout` send SIGTERM: the CLI unwinds like Ctrl-C and leaves no partial folder."""
    import os
    import signal
    import subprocess
    import sys
    import time

    code = ("import sys, time; from taskvec.cli import main; import taskvec.commands.theory as t\n"
            "from taskvec.io import atomic_dir\n"
            "def slow(args):\n"
            "    with atomic_dir(args.out) as tmp:\n"
            "        (tmp / 'a').write_text('x'); print('ready', flush=True); time.sleep(60)\n"
            "t.run = slow\n"
            "sys.exit(main(['theory', '--eigenvalues', 'x.npy', '--n', '4', '--out', sys.argv[1]]))\n")
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.2)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143 and "interrupted" in err
    assert not out.exists() and not list(tmp_path.glob(".o.partial-*"))


def test_out_inside_an_input_folder_is_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(TaskvecError, match="lies inside the input folder"):
        _write_inputs(model / "sub", inputs=[model])
    assert sorted(p.name for p in model.iterdir()) == ["model.safetensors"]
    _write_inputs(tmp_path / "beside", inputs=[model])  # next to it is fine


def test_partial_of_a_killed_but_unreaped_run_is_swept(tmp_path):
    """Right after `timeout -s KILL`, the killed run is a zombie until its parent reaps it: already gone."""
    import signal
    import subprocess
    import sys
    import time

    from taskvec.io import PARTIAL_OWNER

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    proc.send_signal(signal.SIGKILL)
    time.sleep(0.5)  # dead, and not waited for: a zombie
    stale = tmp_path / ".out.partial-z"
    stale.mkdir()
    (stale / PARTIAL_OWNER).write_text(f"{proc.pid}\n")
    _write(tmp_path / "out")
    proc.wait()
    assert not stale.exists()


def test_overwrite_without_a_listing_never_loses_a_users_files(tmp_path, monkeypatch):
    """A folder that only a report's file name (results.json) or an older plain marker calls taskvec's is
    replaced only when all it holds is what taskvec writes; a user's notes or data next to it stay."""
    monkeypatch.setenv("TASKVEC_CACHE", str(tmp_path / "cache"))
    proj = tmp_path / "myproj"
    (proj / "data").mkdir(parents=True)
    (proj / "results.json").write_text("{}")
    (proj / "thesis.tex").write_text("important")
    (proj / "data" / "d.csv").write_text("x")
    with pytest.raises(TaskvecError, match=r"holds files taskvec does not write \(data/d.csv, thesis.tex\)"):
        _write(proj, overwrite=True)
    assert (proj / "thesis.tex").read_text() == "important" and (proj / "data" / "d.csv").is_file()
    (proj / OUTPUT_MARKER).write_text("written by taskvec\n")  # an older taskvec's marker: no listing either
    with pytest.raises(TaskvecError, match="holds files taskvec does not write"):
        _write(proj, overwrite=True)
    (proj / "thesis.tex").unlink()
    (proj / "data" / "d.csv").unlink()
    _write(proj, overwrite=True)  # only what taskvec writes: replaced
    assert not (proj / "results.json").exists()
