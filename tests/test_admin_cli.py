"""`cache list/prune` and `ops list` through click's CliRunner (the real commands, in-process),
on real files in temp dirs: cache entries with explicit access times, children's links, and
operation files as the service writes them."""

from __future__ import annotations

import hashlib
import io
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from tedge_firmware.cli.admin import cache_group, format_age, short_ids
from tedge_firmware.cli.main import main_group
from tedge_firmware.core.freshness import CachedUrl
from tedge_firmware.core.operation import FetchRecord, OperationRecord, file_id_for_url
from tedge_firmware.shell.cache import FirmwareCache
from tedge_firmware.shell.store import fetch_store, operation_store

MiB = 2**20
DAY = 86400


@pytest.fixture(autouse=True)
def no_tedge_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A developer's own TEDGE_* variables must not leak into these tests."""
    for name in list(os.environ):
        if name.upper().startswith("TEDGE_"):
            monkeypatch.delenv(name)
    yield


class Gateway:
    """A config dir and a data dir laid out as the service leaves them."""

    def __init__(self, root: Path, cache_config: str = "") -> None:
        self.config_dir = root / "etc"
        self.data = root / "data"
        self.cache_dir = self.data / "cache"
        self.firmware_dir = self.data / "firmware"
        self.file_ids: dict[str, str] = {}  # SHA-256 → the FILE_ID of the URL it came from
        self.config_dir.mkdir()
        (self.config_dir / "tedge.toml").write_text(
            f'[data]\npath = "{self.data}"\n{cache_config}', encoding="utf-8"
        )

    def cached(self, url: str, size: int, idle: float) -> str:
        """A cached firmware for `url` (bytes of its own), last used `idle` seconds ago; its
        SHA-256, the name `cache list` shows."""
        seed = hashlib.sha256(url.encode()).digest()
        content = (seed * (size // len(seed) + 1))[:size]
        cache = FirmwareCache(self.cache_dir, self.data / "file-transfer")
        cache.make_directories()
        incoming = cache.incoming(file_id_for_url(url))
        incoming.write_bytes(content)
        digest = hashlib.sha256(content).hexdigest()
        cache.store(file_id_for_url(url), CachedUrl(url, digest, size), incoming)
        entry = self.content(digest)
        os.utime(entry, (time.time() - idle, entry.stat().st_mtime))
        self.file_ids[digest] = file_id_for_url(url)
        return digest

    def content(self, sha256: str) -> Path:
        return self.cache_dir / "sha256" / sha256

    def link(self, child: str, sha256: str) -> None:
        """Published to `child` as the service does it (without counting as a use)."""
        folder = self.data / "file-transfer" / child / "firmware_update"
        folder.mkdir(parents=True, exist_ok=True)
        os.symlink(self.content(sha256).absolute(), folder / self.file_ids[sha256])

    def entries(self) -> set[str]:
        folder = self.cache_dir / "sha256"
        return {path.name for path in folder.iterdir()} if folder.exists() else set()

    def run(self, *args: str, env: dict[str, str] | None = None) -> Result:
        return CliRunner().invoke(
            main_group, [*args, "--config-dir", str(self.config_dir)], obj={}, env=env
        )

    def request_sent(
        self, op_id: str, child: str, url: str, attempt: int = 1, **progress: object
    ) -> Path:
        record = OperationRecord(op_id, child, "image", "1.0", url, "http://gw/x", "ab", attempt, **progress)  # type: ignore[arg-type]
        operation_store(self.firmware_dir).save(record)
        return self.firmware_dir / op_id

    def waiting(self, op_id: str, child: str, url: str, version: str = "2.0") -> Path:
        fetch_store(self.firmware_dir).save(FetchRecord(op_id, child, "image", version, url, 1))
        return self.firmware_dir / ".fetching" / op_id


def _permissions_apply() -> bool:
    """Whether a directory with mode 000 is unreadable here (not for root with its usual
    capabilities; yes for root without CAP_DAC_OVERRIDE, e.g. under `setpriv --inh-caps=-all`)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        os.chmod(folder, 0)
        try:
            os.listdir(folder)
        except PermissionError:
            return True
        finally:
            os.chmod(folder, 0o700)
    return False


needs_permissions = pytest.mark.skipif(
    not _permissions_apply(), reason="this process reads every directory (root)"
)


def assert_one_error_line(result: Result, contains: str, code: int) -> None:
    assert result.exit_code == code, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("error: ")
    assert result.stderr.count("\n") == 1, result.stderr
    assert contains in result.stderr, result.stderr
    assert "Traceback" not in result.output


def lines_with(result: Result, word: str) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith(word)]


# --- cache list --------------------------------------------------------------------------------


def test_list_shows_entries_least_recently_used_first_with_their_children(tmp_path: Path) -> None:
    gateway = Gateway(tmp_path, '[firmware.cache]\nmax_size = "64MiB"\nmax_age = 604800\n')
    new = gateway.cached("http://c/new", 2 * MiB, idle=60)
    old = gateway.cached("http://c/old", 3 * MiB, idle=3 * DAY)
    gateway.link("child1", new)
    gateway.link("child2", new)

    result = gateway.run("cache", "list")

    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if line.startswith((old[:12], new[:12]))]
    assert [row.split()[0] for row in rows] == [old[:12], new[:12]]
    assert "3.0 MiB" in rows[0] and "(3 d ago)" in rows[0] and rows[0].split()[-2:] == ["-", "http://c/old"]
    assert "2.0 MiB" in rows[1] and "(1 min ago)" in rows[1] and "child1, child2" in rows[1]
    assert rows[1].rstrip().endswith("http://c/new")  # the URLs that serve these bytes
    assert f"2 cached firmware, 5.0 MiB in {gateway.cache_dir}; 1 in use" in result.stdout
    assert (
        "limits: firmware.cache.max_size 64.0 MiB, firmware.cache.max_age 604800 s (7 d)"
        in result.stdout
    )
    assert "over the limits" not in result.stdout


def test_list_changes_nothing(tmp_path: Path) -> None:
    gateway = Gateway(tmp_path, "[firmware.cache]\nmax_size = 1\n")
    file_id = gateway.cached("http://c/a", 10, idle=5 * DAY)
    before = gateway.content(file_id).stat()

    result = gateway.run("cache", "list")

    assert "over the limits: `tedge-firmware cache prune` would remove 1 (10 B)" in result.stdout
    after = gateway.content(file_id).stat()
    assert (after.st_atime_ns, after.st_mtime_ns) == (before.st_atime_ns, before.st_mtime_ns)


def test_list_counts_an_entry_an_operation_waits_for_as_in_use(tmp_path: Path) -> None:
    gateway = Gateway(tmp_path, "[firmware.cache]\nmax_size = 1\n")
    file_id = gateway.cached("http://c/awaited", 10, idle=DAY)
    gateway.waiting("op1", "child1", "http://c/awaited")

    result = gateway.run("cache", "list")

    row = lines_with(result, file_id[:12])[0]
    assert "(an operation waiting for it)" in row
    assert "1 in use" in result.stdout
    assert "over the limits" not in result.stdout  # prune would keep it


def test_list_without_cache_directory_is_friendly_and_creates_nothing(tmp_path: Path) -> None:
    gateway = Gateway(tmp_path)

    result = gateway.run("cache", "list")

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"no cached firmware in {gateway.cache_dir}",
        "limits: firmware.cache.max_size none, firmware.cache.max_age none",
    ]
    assert not gateway.data.exists()


def test_list_ignores_partial_downloads_and_hidden_files(tmp_path: Path) -> None:
    gateway = Gateway(tmp_path)
    (gateway.cache_dir / "sha256").mkdir(parents=True)
    (gateway.cache_dir / "incoming").mkdir(parents=True)
    (gateway.cache_dir / "incoming" / f"{'a' * 64}.part").write_bytes(b"x")
    (gateway.cache_dir / "sha256" / ".hidden").write_bytes(b"x")
    (gateway.cache_dir / "sha256" / "not-a-digest").write_bytes(b"x")

    assert gateway.run("cache", "list").stdout.startswith("no cached firmware in ")


def test_short_ids_grow_until_they_tell_entries_apart() -> None:
    names = ["0123456789abcdef" + "0" * 48, "0123456789abcdee" + "0" * 48, "ffff" + "0" * 60]
    assert short_ids(names) == {
        names[0]: "0123456789abcdef",
        names[1]: "0123456789abcdee",
        names[2]: "ffff000000000000",
    }
    assert short_ids(["a" * 64, "b" * 64]) == {"a" * 64: "a" * 12, "b" * 64: "b" * 12}
    assert short_ids(["abc", "abcd"]) == {"abc": "abc", "abcd": "abcd"}


def test_list_shows_ids_long_enough_to_tell_apart(tmp_path: Path) -> None:
    gateway = Gateway(tmp_path)
    (gateway.cache_dir / "sha256").mkdir(parents=True)
    for name in ("0123456789abcdef" + "0" * 48, "0123456789abcdee" + "0" * 48):
        gateway.content(name).write_bytes(b"x")

    result = gateway.run("cache", "list")

    assert len(lines_with(result, "0123456789abcdef ")) == 1
    assert len(lines_with(result, "0123456789abcdee ")) == 1


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(-5, "0 s"), (59, "59 s"), (60, "1 min"), (3599, "59 min"), (3600, "1 h"),
     (5400, "1 h 30 min"), (DAY, "1 d"), (DAY + 7200, "1 d 2 h"), (30 * DAY, "30 d")],
)  # fmt: skip
def test_format_age(seconds: float, text: str) -> None:
    assert format_age(seconds) == text


def test_config_dir_of_the_main_group_is_used(tmp_path: Path) -> None:
    gateway = Gateway(tmp_path)
    file_id = gateway.cached("http://c/a", 10, idle=0)

    result = CliRunner().invoke(
        main_group, ["--config-dir", str(gateway.config_dir), "cache", "list"], obj={}
    )

    assert result.exit_code == 0, result.output
    assert lines_with(result, file_id[:12])


def test_no_config_file_uses_defaults_and_the_environment(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "cache" / "sha256").mkdir(parents=True)
    (data / "cache" / "sha256" / ("c" * 64)).write_bytes(b"x" * 10)

    empty = tmp_path / "etc"  # a config dir without tedge.toml (a named dir must exist)
    empty.mkdir()
    result = CliRunner().invoke(
        main_group,
        ["cache", "list", "--config-dir", str(empty)],
        obj={},
        env={"TEDGE_DATA_PATH": str(data)},
    )

    assert result.exit_code == 0, result.output
    assert lines_with(result, "c" * 12)


def test_bad_config_file_is_one_error_line(tmp_path: Path) -> None:
    gateway = Gateway(tmp_path, '[firmware.cache]\nmax_size = "lots"\n')

    for args in (("cache", "list"), ("cache", "prune"), ("ops", "list")):
        assert_one_error_line(gateway.run(*args), "'firmware.cache.max_size'", code=1)


def test_cache_directory_that_is_a_file_is_one_error_line(tmp_path: Path) -> None:
    gateway = Gateway(tmp_path)
    gateway.data.mkdir()
    gateway.cache_dir.write_text("not a directory")

    assert_one_error_line(gateway.run("cache", "list"), f"cannot read {gateway.cache_dir}", 1)
    assert_one_error_line(
        gateway.run("cache", "prune", "--all"), f"cannot read {gateway.cache_dir}", 1
    )
    assert gateway.cache_dir.read_text() == "not a directory"


@needs_permissions
def test_unreadable_cache_directory_is_one_error_line(tmp_path: Path) -> None:
    gateway = Gateway(tmp_path)
    gateway.cached("http://c/a", 10, idle=0)
    gateway.cache_dir.chmod(0)
    try:
        assert_one_error_line(gateway.run("cache", "list"), "Permission denied", 1)
    finally:
        gateway.cache_dir.chmod(0o755)


# --- cache prune -------------------------------------------------------------------------------


def four_entries(gateway: Gateway) -> list[str]:
    """1 MiB each, last used 4, 3, 2 and 1 days ago."""
    return [gateway.cached(f"http://c/{days}", MiB, idle=days * DAY) for days in (4, 3, 2, 1)]


def test_prune_by_size_removes_least_recently_used_first(tmp_path: Path) -> None:
    gateway = Gateway(tmp_path, '[firmware.cache]\nmax_size = "2MiB"\n')
    ids = four_entries(gateway)

    result = gateway.run("cache", "prune")

    assert result.exit_code == 0, result.output
    assert gateway.entries() == {ids[2], ids[3]}
    removed = lines_with(result, "removed ")
    assert [line.split()[1] for line in removed[:2]] == [ids[0][:12], ids[1][:12]]
    assert "least recently used (last used 4 d ago), cache above 2.0 MiB" in removed[0]
    assert result.stdout.splitlines()[-1] == "removed 2, freed 2.0 MiB, kept 0 in use"


def test_prune_by_size_skips_entries_published_to_a_child(tmp_path: Path) -> None:
    gateway = Gateway(tmp_path, '[firmware.cache]\nmax_size = "2MiB"\n')
    ids = four_entries(gateway)
    gateway.link("child1", ids[0])  # the oldest, but a child may be downloading it

    result = gateway.run("cache", "prune")

    assert gateway.entries() == {ids[0], ids[3]}
    assert result.stdout.splitlines()[-1] == "removed 2, freed 2.0 MiB, kept 1 in use"


def test_prune_by_age(tmp_path: Path) -> None:
    gateway = Gateway(tmp_path, f"[firmware.cache]\nmax_age = {int(2.5 * DAY)}\n")
    ids = four_entries(gateway)
    gateway.link("child1", ids[0])

    result = gateway.run("cache", "prune")

    assert gateway.entries() == {ids[0], ids[2], ids[3]}
    assert lines_with(result, "removed ")[0] == (
        f"removed {ids[1][:12]} 1.0 MiB: not used for 3 d, max age 2 d 12 h"
    )


def test_prune_all_keeps_entries_in_use(tmp_path: Path) -> None:
    gateway = Gateway(tmp_path)
    ids = four_entries(gateway)
    gateway.link("child1", ids[1])
    gateway.waiting("op1", "child2", "http://c/2")  # downloaded for op1, not linked yet

    result = gateway.run("cache", "prune", "--all")

    assert result.exit_code == 0, result.output
    assert gateway.entries() == {ids[1], ids[2]}
    assert f"kept {ids[2][:12]} 1.0 MiB: a stored operation is waiting for it" in result.stdout
    assert result.stdout.splitlines()[-1] == "removed 2, freed 2.0 MiB, kept 2 in use"
    assert (gateway.firmware_dir / ".fetching" / "op1").exists()


def test_dry_run_removes_nothing(tmp_path: Path) -> None:
    gateway = Gateway(tmp_path, '[firmware.cache]\nmax_size = "1MiB"\n')
    ids = four_entries(gateway)
    before = {file_id: gateway.content(file_id).stat().st_atime_ns for file_id in ids}

    for args, count in ((("--dry-run",), 3), (("--all", "--dry-run"), 4)):
        result = gateway.run("cache", "prune", *args)
        assert result.exit_code == 0, result.output
        assert len(lines_with(result, "would remove ")) == count
        assert lines_with(result, "removed ") == []
        assert result.stdout.splitlines()[-1] == (
            f"dry run: would remove {count} ({count}.0 MiB), keep 0 in use; nothing was removed"
        )
    after = {file_id: gateway.content(file_id).stat().st_atime_ns for file_id in ids}
    assert after == before


def test_options_override_the_configured_limits(tmp_path: Path) -> None:
    gateway = Gateway(tmp_path, f'[firmware.cache]\nmax_size = "1GiB"\nmax_age = {10 * DAY}\n')
    ids = four_entries(gateway)

    result = gateway.run("cache", "prune", "--max-size", "3MiB")
    assert "limits: firmware.cache.max_size 3.0 MiB, firmware.cache.max_age 864000 s" in (
        result.stdout
    )
    assert gateway.entries() == set(ids[1:])

    result = gateway.run("cache", "prune", "--max-age", str(int(1.5 * DAY)))
    assert "limits: firmware.cache.max_size 1.0 GiB, firmware.cache.max_age 129600 s" in (
        result.stdout
    )
    assert gateway.entries() == {ids[3]}


def test_without_limits_prune_says_so_and_removes_nothing(tmp_path: Path) -> None:
    gateway = Gateway(tmp_path)
    ids = four_entries(gateway)

    result = gateway.run("cache", "prune")

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("no cache limits configured")
    assert gateway.entries() == set(ids)


def test_prune_on_a_missing_cache_creates_nothing(tmp_path: Path) -> None:
    gateway = Gateway(tmp_path, "[firmware.cache]\nmax_size = 1\n")

    result = gateway.run("cache", "prune", "--all")

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == "removed 0, freed 0 B, kept 0 in use"
    assert not gateway.data.exists()


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--max-size", "-1"),
        ("--max-size", "0"),
        ("--max-size", "lots"),
        ("--max-size", "5 parsecs"),
        ("--max-size", "\uff11\uff12MiB"),  # fullwidth digits
        ("--max-size", "9" * 400),  # more than a float holds
        ("--max-size", "1\n2"),
        ("--max-size", ""),
        ("--max-size", "--all"),
        ("--max-age", "-1"),
        ("--max-age", "0"),
        ("--max-age", "1.5"),
        ("--max-age", "1_000"),
        ("--max-age", "\u0663\u0660"),  # Arabic-Indic digits
        ("--max-age", "99999999999999999999"),
        ("--max-age", "9" * 5000),  # more digits than int() takes
        ("--max-age", "\x1b[31m"),
    ],
)
def test_hostile_option_values_are_one_error_line(tmp_path: Path, option: str, value: str) -> None:
    gateway = Gateway(tmp_path)
    ids = four_entries(gateway)

    result = gateway.run("cache", "prune", option, value)

    assert_one_error_line(result, f"invalid value for '{option}'", code=2)
    assert "\x1b" not in result.stderr
    assert len(result.stderr) < 300
    assert gateway.entries() == set(ids)


def test_all_with_limits_is_a_usage_error(tmp_path: Path) -> None:
    gateway = Gateway(tmp_path)
    ids = four_entries(gateway)

    assert_one_error_line(gateway.run("cache", "prune", "--all", "--max-size", "1MiB"), "--all", 2)
    assert gateway.entries() == set(ids)


def test_an_entry_linked_after_the_plan_is_kept(tmp_path: Path) -> None:
    """The service may publish an entry between the plan and the removal: evict refuses it."""
    from rich.console import Console

    from tedge_firmware.cli.admin import _Pruner
    from tedge_firmware.core.cache_policy import CacheLimits

    gateway = Gateway(tmp_path)
    ids = four_entries(gateway)
    cache = FirmwareCache(gateway.cache_dir, gateway.data / "file-transfer")
    output = io.StringIO()
    console = Console(file=output, width=200, soft_wrap=True)
    pruner = _Pruner(cache, gateway.firmware_dir, console, dry_run=False)
    gateway.link("child1", ids[0])  # after the pruner listed the entries
    gateway.content(ids[1]).unlink()  # removed by the service meanwhile

    pruner.run(CacheLimits(), remove_all=True)

    text = output.getvalue()
    assert f"kept {ids[0][:12]} 1.0 MiB: published to a child meanwhile" in text
    assert f"gone {ids[1][:12]} 1.0 MiB: removed by someone else meanwhile" in text
    assert gateway.entries() == {ids[0]}
    assert text.splitlines()[-1] == "removed 2, freed 2.0 MiB, kept 1 in use"


# --- ops list ----------------------------------------------------------------------------------


def test_ops_list_shows_operations_from_both_stores_oldest_first(tmp_path: Path) -> None:
    gateway = Gateway(tmp_path)
    sent = gateway.request_sent("op-sent", "child1", "http://c/a", attempt=3)
    waiting = gateway.waiting("op-wait", "child2", "http://c/b")
    gateway.request_sent("op-both", "child3", "http://c/c")
    gateway.waiting("op-both", "child3", "http://c/c")  # leftover: shown once
    os.utime(sent, (time.time(), time.time() - 2 * 3600))
    os.utime(waiting, (time.time(), time.time() - 60))

    result = gateway.run("ops", "list")

    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("op-")]
    assert [row[0] for row in rows] == ["op-sent", "op-wait", "op-both"]
    assert rows[0] == ["op-sent", "child1", "image", "1.0", "request", "sent", "3", "2", "h",
                       "http://c/a"]  # fmt: skip
    assert rows[1] == ["op-wait", "child2", "image", "2.0", "waiting", "for", "download", "1",
                       "1", "min", "http://c/b"]  # fmt: skip
    assert rows[2][4:6] == ["request", "sent"]
    assert "3 operations in progress (1 waiting for their download)" in result.stdout


def test_ops_list_shows_how_far_each_operation_got(tmp_path: Path) -> None:
    from tedge_firmware.core.operation import State

    gateway = Gateway(tmp_path)
    gateway.request_sent("op-1", "child1", "http://c/a")
    gateway.request_sent("op-2", "child2", "http://c/a", state=State.EXECUTING)
    gateway.request_sent("op-3", "child3", "http://c/a", state=State.SUCCESSFUL, to_cloud=("503,c8y_Firmware,\n",))
    gateway.request_sent("op-4", "child4", "http://c/a", state=State.FAILED, to_cloud=('502,c8y_Firmware,"x"\n',))

    result = gateway.run("ops", "list")

    assert result.exit_code == 0, result.output
    states = {line.split()[0]: " ".join(line.split()[4:-4]) for line in result.stdout.splitlines() if line.startswith("op-")}
    assert states == {
        "op-1": "request sent",
        "op-2": "executing",
        "op-3": "successful, telling Cumulocity",
        "op-4": "failed, telling Cumulocity",
    }


def test_ops_list_shows_unreadable_files_and_leaves_them_in_place(tmp_path: Path) -> None:
    gateway = Gateway(tmp_path)
    gateway.request_sent("op-good", "child1", "http://c/a")
    corrupt = gateway.firmware_dir / "op-corrupt"
    corrupt.write_bytes(b'{"operation_id": "op-corrupt", ')
    renamed = gateway.firmware_dir / "op-renamed"
    renamed.write_text((gateway.firmware_dir / "op-good").read_text())
    bad_child = gateway.waiting("op-bad-child", "../etc", "http://c/b")
    (gateway.firmware_dir / ".op-x.tmp").write_text("half written")  # a save in progress
    (gateway.firmware_dir / ".corrupt").mkdir()
    (gateway.firmware_dir / ".corrupt" / "op-old").write_text("moved aside by the service")
    before = sorted(str(path) for path in gateway.firmware_dir.rglob("*"))

    result = gateway.run("ops", "list")

    assert result.exit_code == 0, result.output
    assert [line.split()[0] for line in lines_with(result, "op-")] == ["op-good"]
    unreadable = lines_with(result, "unreadable: ")
    assert unreadable == [
        f"unreadable: {corrupt}: not JSON: Expecting property name enclosed in double quotes: "
        "line 1 column 32 (char 31) (left as it is)",
        f"unreadable: {renamed}: operation_id 'op-good' differs from the file name (left as it is)",
        f"unreadable: {bad_child}: not usable: the child id '../etc' contains '/', '+', '#' or '\\\\'"
        " (left as it is)",
    ]
    assert "1 unusable file moved aside earlier by the service, kept in .corrupt/" in result.stdout
    assert sorted(str(path) for path in gateway.firmware_dir.rglob("*")) == before
    assert corrupt.read_bytes() == b'{"operation_id": "op-corrupt", '


def test_ops_list_without_operations(tmp_path: Path) -> None:
    gateway = Gateway(tmp_path)

    result = gateway.run("ops", "list")

    assert result.exit_code == 0, result.output
    assert result.stdout == f"no firmware operations in progress in {gateway.firmware_dir}\n"
    assert not gateway.data.exists()


def test_ops_list_escapes_control_characters_from_files(tmp_path: Path) -> None:
    gateway = Gateway(tmp_path)
    gateway.request_sent("op1", "child1", "http://c/\x1b[2Jimage")
    (gateway.firmware_dir / "op\x1b]0;title\x07").write_text("junk")

    result = gateway.run("ops", "list")

    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert "http://c/\\x1b[2Jimage" in result.stdout
    assert "op\\x1b]0;title\\x07" in result.stdout


def test_ops_list_skips_odd_entries(tmp_path: Path) -> None:
    gateway = Gateway(tmp_path)
    gateway.firmware_dir.mkdir(parents=True)
    (gateway.firmware_dir / "op-dir").mkdir()
    (gateway.firmware_dir / "op-link").symlink_to("/nonexistent")
    (gateway.firmware_dir / ".corrupt").write_text("a file where a directory belongs")
    (gateway.firmware_dir / ".fetching" / ".corrupt").mkdir(parents=True)
    (gateway.firmware_dir / ".fetching" / ".corrupt" / "op").write_text("set aside")

    result = gateway.run("ops", "list")

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"no firmware operations in progress in {gateway.firmware_dir}",
        "1 unusable file moved aside earlier by the service, kept in .corrupt/",
    ]


@needs_permissions
def test_ops_list_unreadable_firmware_directory_is_one_error_line(tmp_path: Path) -> None:
    gateway = Gateway(tmp_path)
    gateway.request_sent("op1", "child1", "http://c/a")
    gateway.firmware_dir.chmod(0)
    try:
        assert_one_error_line(gateway.run("ops", "list"), "Permission denied", 1)
    finally:
        gateway.firmware_dir.chmod(0o755)


# --- the store's two ways of reading -----------------------------------------------------------


def test_scan_leaves_corrupt_files_and_load_all_still_quarantines_them(tmp_path: Path) -> None:
    store = operation_store(tmp_path)
    store.save(OperationRecord("op1", "child1", "image", "1.0", "http://c/a", "u", "ab", 1))
    (tmp_path / "op2").write_text("not json")

    scanned = store.scan()

    assert [(found.path.name, found.problem is None) for found in scanned] == [
        ("op1", True),
        ("op2", False),
    ]
    assert scanned[0].modified == (tmp_path / "op1").stat().st_mtime
    assert (tmp_path / "op2").exists() and not (tmp_path / ".corrupt").exists()

    assert [record.operation_id for record in store.load_all()] == ["op1"]
    assert (tmp_path / ".corrupt" / "op2").read_text() == "not json"


def test_cache_group_alone_takes_its_config_dir(tmp_path: Path) -> None:
    gateway = Gateway(tmp_path)
    file_id = gateway.cached("http://c/a", 10, idle=0)

    result = CliRunner().invoke(cache_group, ["list", "--config-dir", str(gateway.config_dir)])

    assert result.exit_code == 0, result.output
    assert lines_with(result, file_id[:12])


def test_long_urls_stay_whole_on_one_line_in_a_pipe(tmp_path: Path) -> None:
    gateway = Gateway(tmp_path)
    url = "https://t.example.com/inventory/binaries/" + "x" * 300
    gateway.request_sent("op1", "child1", url)

    result = gateway.run("ops", "list")

    assert any(line.startswith("op1 ") and line.rstrip().endswith(url) for line in
               result.stdout.splitlines())  # fmt: skip
