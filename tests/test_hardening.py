"""Issue 10: settings, errors, hostile input, re-ingest edge cases, the damaged home and kb doctor (fakes)."""

import json
import os
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import FakeGenerator
from kb.config import BadSetting, Settings
from kb.errors import DamagedIndex, Locked

ROOT = Path(__file__).resolve().parents[1]


# --- settings -----------------------------------------------------------------------------------------


def test_settings_precedence_defaults_file_env_flag(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    assert Settings.load(home).ctx == 2048 and Settings.load(home).origins["ctx"] == "default"
    (home / "config.toml").write_text("ctx = 1024\ntemperature = 0.5\nextractive = true\n")
    s = Settings.load(home)
    assert (s.ctx, s.temperature, s.extractive) == (1024, 0.5, True) and s.origins["ctx"].endswith("config.toml")
    monkeypatch.setenv("KB_CTX", "512")
    monkeypatch.setenv("KB_EXTRACTIVE", "no")
    s = Settings.load(home)
    assert (s.ctx, s.extractive, s.temperature) == (512, False, 0.5) and s.origins["ctx"] == "env KB_CTX"
    s = Settings.load(home, ctx=256, temperature=None)
    assert (s.ctx, s.temperature) == (256, 0.5) and s.origins["ctx"] == "flag"


@pytest.mark.parametrize("config, env, message", [
    ("temprature = 0.1\n", {}, "unknown setting 'temprature'"),
    ("ctx = 'big'\n", {}, "ctx must be a whole number"),
    ("search_mode = 'fuzzy'\n", {}, "one of dense, lexical, hybrid"),
    ("min_score = 2\n", {}, "from 0.0 to 1.0"),
    ("ctx = [\n", {}, "not valid TOML"),
    ("", {"KB_CTX": "abc"}, "KB_CTX = 'abc'"),
    ("", {"KB_EXTRACTIVE": "maybe"}, "true or false"),
])
def test_bad_settings_are_clear_errors(tmp_path, monkeypatch, config, env, message):
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(config)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(BadSetting) as e:
        Settings.load(home)
    assert message in str(e.value)
    if "temprature" in config:
        assert "temperature" in e.value.hint  # a close match is suggested


def test_cli_config_shows_values_and_origins_and_a_bad_one_is_one_line(tmp_path, monkeypatch):
    from kb.cli import cli

    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text("top_k = 8\n")
    monkeypatch.setenv("KB_SEED", "7")
    result = CliRunner().invoke(cli, ["config", "--kb", str(home), "--json"])
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert rows["top_k"]["value"] == 8 and rows["top_k"]["from"].endswith("config.toml")
    assert rows["seed"]["from"] == "env KB_SEED" and rows["ctx"]["from"] == "default"
    (home / "config.toml").write_text("temprature = 0.1\n")
    result = CliRunner().invoke(cli, ["search", "x", "--kb", str(home)])
    assert result.exit_code == 1 and "unknown setting 'temprature'" in result.stderr and "Traceback" not in result.output


def test_every_setting_has_help_and_every_option_a_setting():
    from kb.config import SETTINGS_HELP
    from kb.options import ALL

    assert set(Settings.names()) == set(SETTINGS_HELP)
    assert {o.setting for o in ALL} <= set(SETTINGS_HELP)


# --- errors ---------------------------------------------------------------------------------------------


def test_unexpected_errors_are_one_line_on_stderr_and_kb_debug_shows_the_traceback(tmp_path, monkeypatch):
    import kb.api
    from kb.cli import cli

    def boom(*args, **kwargs):
        raise RuntimeError("the disk fell off")

    monkeypatch.setattr(kb.api.KnowledgeBase, "status", boom)
    result = CliRunner().invoke(cli, ["status", "--kb", str(tmp_path)])
    assert result.exit_code == 1 and result.stdout == ""
    assert "Error: unexpected RuntimeError: the disk fell off" in result.stderr and "KB_DEBUG" in result.stderr
    monkeypatch.setenv("KB_DEBUG", "1")
    result = CliRunner().invoke(cli, ["status", "--kb", str(tmp_path)])
    assert isinstance(result.exception, RuntimeError)


def test_an_unparsable_chat_template_is_reported_once_with_the_model(caplog):
    from kb.generator import compile_chat_template

    with caplog.at_level("WARNING", logger="kb"):
        for _ in range(3):
            compile_chat_template("{% for x in %}", "broken-model.gguf")
    warnings = [r for r in caplog.records if "broken-model.gguf" in r.getMessage()]
    assert len(warnings) == 1 and "ChatML" in warnings[0].getMessage()


# --- ingest edge cases ------------------------------------------------------------------------------------


def test_reingest_after_a_rename_reuses_the_vectors(make_kb, corpus, fake_embedder):
    kb = make_kb()
    kb.ingest([corpus])
    embedded = fake_embedder.texts_embedded
    (corpus / "alpha.md").rename(corpus / "alpha-renamed.md")
    report = kb.ingest([corpus])
    assert [Path(p).name for p in report.added] == ["alpha-renamed.md"]
    assert [Path(p).name for p in report.removed] == ["alpha.md"]
    assert fake_embedder.texts_embedded == embedded and report.reused_chunks > 0
    assert kb.search("significance level statistics", k=1)[0].path.endswith("alpha-renamed.md")


def test_reingest_after_a_file_becomes_unparsable_drops_its_old_version(make_kb, corpus):
    kb = make_kb()
    kb.ingest([corpus])
    (corpus / "beta.txt").write_bytes(b"\x00\x01\x02binary" * 100)
    report = kb.ingest([corpus])
    failure = next(f for f in report.failed if f.path.endswith("beta.txt"))
    assert "binary" in failure.reason and "previous version was removed" in failure.reason
    assert not any(h.path.endswith("beta.txt") for h in kb.search("beta particles electrons decay", k=5))


def test_reingest_after_the_root_folder_is_deleted_removes_its_documents(make_kb, corpus, tmp_path):
    import shutil

    kb = make_kb()
    kb.ingest([corpus / "sub"])
    kb.ingest([corpus / "beta.txt"])  # a file given on its own
    shutil.rmtree(corpus / "sub")
    (corpus / "beta.txt").unlink()
    report = kb.ingest([corpus / "sub", corpus / "beta.txt"])
    assert report.ok and not report.failed
    assert sorted(Path(p).name for p in report.removed) == ["beta.txt", "gamma.md"]
    assert kb.status()["documents"] == 0
    typo = kb.ingest([tmp_path / "never-ingested"])  # nothing recorded there: an error, nothing removed
    assert typo.failed and not typo.removed


def test_special_files_are_skipped_with_a_reason_and_never_read(make_kb, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "good.md").write_text("# Good\n\nA good note about gardening.\n")
    os.mkfifo(docs / "note.md")
    (docs / "zero.txt").symlink_to("/dev/zero")
    (docs / "r.md").symlink_to("/dev/urandom")
    big = docs / "huge.txt"
    with big.open("wb") as f:  # sparse: 65 MB on paper, nothing on disk
        f.truncate(65 << 20)
    started = time.monotonic()
    report = make_kb().ingest([docs])
    assert time.monotonic() - started < 20
    assert [Path(p).name for p in report.added] == ["good.md"]
    reasons = {Path(p).name: r for p, r in report.skipped_reasons.items()}
    assert "named pipe" in reasons["note.md"] and "device" in reasons["zero.txt"] and "device" in reasons["r.md"]
    assert "too large" in reasons["huge.txt"]


def test_a_yaml_alias_bomb_fails_alone_and_fast(make_kb, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i, name in enumerate("bcdefghij"):
        prev = "abcdefghij"[i]
        levels.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    (docs / "bomb.md").write_text("---\n" + "\n".join(levels) + "\n---\n\n# Bomb\n\nbody text\n")
    (docs / "good.md").write_text("# Good\n\nA good note about gardening.\n")
    started = time.monotonic()
    report = make_kb().ingest([docs])
    assert time.monotonic() - started < 20
    assert [Path(p).name for p in report.added] == ["good.md"]
    assert "front matter expands" in report.failed[0].reason


def test_a_docx_that_inflates_to_a_huge_part_is_refused_before_parsing(make_kb, tmp_path, monkeypatch):
    import unstructured.partition.docx as docx_partition

    monkeypatch.setattr(docx_partition, "partition_docx", lambda *a, **k: pytest.fail("parsed a zip bomb"))
    bomb = tmp_path / "docs" / "bomb.docx"
    bomb.parent.mkdir()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("[Content_Types].xml", "<Types/>")
        with z.open("word/document.xml", "w", force_zip64=True) as part:
            block = b"\0" * (8 << 20)
            for _ in range(40):  # 320 MB inflated, a few hundred KB on disk
                part.write(block)
    assert bomb.stat().st_size < 5 << 20
    report = make_kb().ingest([bomb.parent])
    assert "inflates to 320 MB" in report.failed[0].reason


def test_deeply_nested_html_says_so(make_kb, tmp_path):
    page = tmp_path / "docs" / "deep.html"
    page.parent.mkdir()
    page.write_text("<html><body>" + "<div>" * 100_000 + "Hidden text." + "</div>" * 100_000 + "</body></html>")
    report = make_kb().ingest([page.parent])
    assert "levels deep" in report.failed[0].reason and "100,00" in report.failed[0].reason


# --- the lock between two processes -------------------------------------------------------------------

HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from kb.store.sqlite import write_lock
    with write_lock(Path(sys.argv[1])):
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def test_the_ingest_lock_between_two_processes(make_kb, corpus, home):
    home.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(home), "2"], stdout=subprocess.PIPE, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == b"held"
        with pytest.raises(Locked, match=f"pid {holder.pid}"):
            make_kb().ingest([corpus])
        waited = []
        report = make_kb().ingest([corpus], wait=30, on_wait=waited.append)
        assert waited == [str(holder.pid)] and len(report.added) == 3
    finally:
        holder.kill()
        holder.wait()


# --- a damaged home, kb doctor ------------------------------------------------------------------------------


@pytest.fixture
def cli_kb(home, monkeypatch, fake_embedder):
    import kb.api
    import kb.generator
    from kb.cli import cli

    monkeypatch.setattr(kb.api, "SentenceTransformerEmbedder", lambda *a, **k: fake_embedder)
    monkeypatch.setattr(kb.generator, "LlamaGenerator", lambda *a, **k: FakeGenerator())
    runner = CliRunner()
    return lambda *args: runner.invoke(cli, [*args, "--kb", str(home)])


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_damaged_database_is_one_line_and_doctor_rebuilds_it(cli_kb, corpus, home, damage):
    assert cli_kb("ingest", str(corpus), "-q").exit_code == 0
    db = home / "kb.db"
    for extra in ("kb.db-wal", "kb.db-shm"):
        (home / extra).unlink(missing_ok=True)
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 2] if damage == "truncate" else os.urandom(len(data)))
    for args in (("search", "alpha"), ("ingest", str(corpus))):
        result = cli_kb(*args)
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert str(db) in result.stderr and "kb doctor" in result.stderr, result.stderr
    checked = cli_kb("doctor")
    assert checked.exit_code == 1 and "PROBLEM" in checked.output and "damaged" in checked.output
    repaired = cli_kb("doctor", "--repair")
    assert repaired.exit_code == 0, repaired.output
    assert "moved aside" in repaired.output and "re-ingested 1 recorded path" in repaired.output
    assert list(home.glob("damaged-*/kb.db"))
    hits = json.loads(cli_kb("search", "alpha greek letter", "--json").output)
    assert hits and hits[0]["path"].endswith("alpha.md")
    assert cli_kb("doctor").exit_code == 0


def test_doctor_repairs_stale_cache_missing_full_text_and_forgotten_files(cli_kb, corpus, home):
    from kb.store.sqlite import SQLiteStore as Store

    assert cli_kb("ingest", str(corpus), "-q").exit_code == 0
    store = Store(home)
    with store.db.conn:
        store.db.execute("DELETE FROM chunks_fts WHERE rowid = (SELECT min(id) FROM chunks)")
        store.db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
    store.close()
    (corpus / "beta.txt").unlink()
    report = json.loads(cli_kb("doctor", "--json").output)
    problems = {f["what"] for f in report["findings"] if f["status"] == "problem"}
    assert problems == {"full-text index", "vector cache", "sources"}
    report = json.loads(cli_kb("doctor", "--repair", "--json").output)
    assert {f["what"] for f in report["findings"] if f["status"] == "fixed"} == problems
    assert json.loads(cli_kb("doctor", "--json").output)["problems"] == 0


# --- CLI commands that had no test ----------------------------------------------------------------------------


def test_cli_status_lists_the_documents(cli_kb, corpus):
    assert cli_kb("ingest", str(corpus), "-q").exit_code == 0
    listed = json.loads(cli_kb("status", "--documents", "--json").output)["document_list"]
    assert sorted(Path(d["path"]).name for d in listed) == ["alpha.md", "beta.txt", "gamma.md"]
    alpha = next(d for d in listed if d["path"].endswith("alpha.md"))
    assert alpha["title"] == "Alpha notes" and alpha["file_type"] == "markdown" and alpha["chunks"] >= 1
    lines = cli_kb("status", "-d").output.splitlines()
    row = next(line for line in lines if line.endswith("alpha.md  (Alpha notes)"))
    assert " markdown " in row and f" {alpha['chunks']} " in row
    assert cli_kb("forget", str(corpus / "beta.txt")).exit_code == 0
    assert "beta.txt" not in cli_kb("status", "-d").output
    assert "document_list" not in json.loads(cli_kb("status", "--json").output)


def test_a_reader_that_goes_away_stops_kb_quietly(tmp_path):
    """`kb status | head -1`: the pipe closes before kb has written; no "Error: Broken pipe" with a hint about
    paths, no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "kb", "status", "--kb", str(tmp_path / "home")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parents[1])
    proc.stdout.close()  # before kb writes its first line
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, stderr
    assert stderr == ""


def test_cli_forget_personas_chat_continue_and_log(cli_kb, corpus):
    assert cli_kb("ingest", str(corpus), "-q").exit_code == 0
    result = cli_kb("forget", str(corpus / "beta.txt"))
    assert result.exit_code == 0 and "removed 1 document" in result.output
    assert cli_kb("forget", str(corpus / "beta.txt")).exit_code == 1
    personas = cli_kb("personas")
    assert "teacher" in personas.output and "editor" in personas.output
    runner = CliRunner()
    from kb.cli import cli

    home = cli_kb("status", "--json")
    home_dir = json.loads(home.output)["home"]
    first = runner.invoke(cli, ["chat", "--kb", home_dir], input="What is the first letter of the Greek alphabet?\n/exit\n")
    assert first.exit_code == 0, first.output
    resumed = runner.invoke(cli, ["chat", "--kb", home_dir, "--continue"], input="/sources\n/exit\n")
    conversation = first.stderr.split("conversation ")[1].split(",")[0]
    assert f"conversation {conversation}," in resumed.stderr
    log = json.loads(cli_kb("log", "--json").output)
    assert log and log[0]["question"].startswith("What is the first letter")


def test_cli_eval_answers_table_and_json(tmp_path, monkeypatch, fake_embedder):
    import kb.api
    import kb.generator
    from kb.cli import cli

    monkeypatch.setattr(kb.api, "SentenceTransformerEmbedder", lambda *a, **k: fake_embedder)
    monkeypatch.setattr(kb.generator, "LlamaGenerator", lambda *a, **k: FakeGenerator())
    data = {"data": [{"title": "t", "paragraphs": [{"context": c, "qas": [{"id": str(i), "question": q,
                                                                            "answers": [{"text": a}]}]}]}
                     for i, (c, q, a) in enumerate([
                         ("The Moon orbits the Earth every 27 days.", "How often does the Moon orbit the Earth?", "27 days"),
                         ("Green tea is brewed at about eighty degrees.", "At what temperature is green tea brewed?", "eighty degrees"),
                         ("A bicycle chain is replaced after stretching half a percent.", "When is a bicycle chain replaced?", "half a percent")])]}
    squad = tmp_path / "mini.json"
    squad.write_text(json.dumps(data))
    runner = CliRunner()
    table = runner.invoke(cli, ["eval", "answers", str(squad), "--kb", str(tmp_path / "home"), "--extractive"])
    assert table.exit_code == 0, table.output
    assert "ans⊇gold" in table.output and "mini" in table.output
    out = json.loads(runner.invoke(cli, ["eval", "answers", str(squad), "--json", "--extractive",
                                         "--kb", str(tmp_path / "home")]).output)
    assert out["language"] == "en" and out["extractive"] == 1.0 and out["answer_contains_gold"] > 0


def test_cli_finetune_resume_refuses_new_settings(tmp_path):
    from kb.cli import cli

    result = CliRunner().invoke(cli, ["finetune", "--resume", "style", "--rank", "16", "--kb", str(tmp_path)])
    assert result.exit_code == 2 and "--rank" in result.output and "cannot change" in result.output
    result = CliRunner().invoke(cli, ["finetune", "--kb", str(tmp_path)])
    assert result.exit_code == 2 and "give DATA" in result.output


def test_adapters_lists_a_stopped_run(tmp_path):
    from kb.cli import cli

    run = tmp_path / "adapters" / "style.run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "checkpoint" / "progress.json").write_text('{"step": 25}')
    result = CliRunner().invoke(cli, ["adapters", "--kb", str(tmp_path)])
    assert "style" in result.output and "stopped run at step 25" in result.output and "--resume style" in result.output


def test_an_interrupted_ask_is_not_logged(make_kb, corpus):
    class Interrupted(FakeGenerator):
        def stream(self, prompt, **kwargs):
            yield "Alpha "
            raise KeyboardInterrupt

    kb = make_kb(generator=Interrupted())
    kb.ingest([corpus])
    stream = kb.ask_stream("What is the first letter of the Greek alphabet?")
    with pytest.raises(KeyboardInterrupt):
        for _ in stream:
            pass
    assert stream.answer is None and kb.log() == []


def test_store_damage_raises_a_typed_error_naming_the_file(tmp_path):
    from kb.store.sqlite import SQLiteStore as Store

    (tmp_path / "kb.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(DamagedIndex) as e:
        Store(tmp_path)
    assert str(tmp_path / "kb.db") in str(e.value) and "kb doctor" in e.value.hint
