"""Hostile entries under the data directory (symlinks planted by a local user) and the
permissions of what storage creates: nothing is followed, written, truncated or removed
through a symlink; new files are 0640 and directories 0750 whatever the umask.
"""

from __future__ import annotations

import os
import stat

from twisted.trial.unittest import SynchronousTestCase

from joblet_persist import config as config_module
from joblet_persist.storage import jobindex, safefs, segment, space
from joblet_persist.storage.api import STREAM_STDOUT, StorageUnavailable
from joblet_persist.storage.local import thd_remove_file, thd_remove_job
from tests.storage_contract import log_batch, metric_batch, metric_payload
from tests.test_storage_local import JOB, StorageTestCase, rows

OTHER = "5b1e8d2c-7f3a-4c19-8e6d-000000000043"


class CountingMetrics:
    """Records the storage metric calls it receives."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args: self.calls.append(name)


def snapshot_tree(root):
    """{relative path: (bytes, mtime_ns, mode)} of every file under ``root``."""
    found = {}
    for base, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(base, name)
            st = os.lstat(path)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = (f.read(), st.st_mtime_ns, st.st_mode)
    return found


class OutsideMixin:
    def make_outside(self):
        """A directory outside the data directory holding one file with a torn-looking tail."""
        outside = os.path.abspath(self.mktemp())
        os.makedirs(outside)
        with open(os.path.join(outside, "precious"), "wb") as f:
            f.write(b"\x1f\x8b\x08 not a gzip member, a file someone cares about")
        return outside


class SymlinkTests(OutsideMixin, StorageTestCase):
    """LocalStorage never goes through a symlink planted under the data directory."""

    def test_job_directory_symlink_is_refused(self):
        """logs/<job> -> outside: the append fails (counted, logged), nothing is created
        outside, another job's data is stored, and deleting the job removes only the link."""
        outside = self.make_outside()
        before = snapshot_tree(outside)
        metrics = CountingMetrics()
        storage = self.make(metrics=metrics)
        self.append(storage, STREAM_STDOUT, rows(0, b"other"), job=OTHER)
        os.makedirs(os.path.join(self.data_dir, "logs"), exist_ok=True)
        link = os.path.join(self.data_dir, "logs", JOB)
        os.symlink(outside, link)
        f = self.failureResultOf(
            storage.append_logs(log_batch(JOB, STREAM_STDOUT, rows(0, b"secret"))),
            safefs.UnsafeEntry,
        )
        self.assertEqual(f.value.filename, link)
        self.assertEqual(snapshot_tree(outside), before)
        self.assertIn("unsafe_entry", metrics.calls)
        self.assertGreaterEqual(storage.unsafe_entries, 1)
        # Other jobs are unaffected.
        self.append(storage, STREAM_STDOUT, rows(1, b"more"), job=OTHER)
        self.assertEqual(self.logs(storage, job=OTHER), [(1, b"other"), (1, b"more")])
        # Deleting the job removes the link, not what it points to.
        self.successResultOf(storage.delete_job(JOB))
        self.assertFalse(os.path.lexists(link))
        self.assertEqual(snapshot_tree(outside), before)

    def test_segment_symlink_is_not_repaired_read_or_written(self):
        """logs/<job>/stdout.log.gz -> outside file: loading the job neither reads nor cuts
        ("torn tail repair") the outside file, appends go to the next segment name, and
        the outside file keeps its bytes and mtime."""
        outside = self.make_outside()
        target = os.path.join(outside, "precious")
        before = snapshot_tree(outside)
        directory = os.path.join(self.data_dir, "logs", JOB)
        os.makedirs(directory)
        link = os.path.join(directory, segment.segment_name("stdout", 0))
        os.symlink(target, link)
        metrics = CountingMetrics()
        storage = self.make(metrics=metrics)
        self.append(storage, STREAM_STDOUT, rows(0, b"fresh"))
        self.assertEqual(self.logs(storage), [(1, b"fresh")])
        self.assertEqual(snapshot_tree(outside), before)
        self.assertTrue(os.path.islink(link))
        self.assertTrue(os.path.isfile(os.path.join(directory, segment.segment_name("stdout", 1))))
        self.assertIn("unsafe_entry", metrics.calls)
        storage = self.restart(storage)
        self.assertEqual(self.logs(storage), [(1, b"fresh")])
        self.successResultOf(storage.delete_job(JOB))
        self.assertFalse(os.path.lexists(directory))
        self.assertEqual(snapshot_tree(outside), before)

    def test_index_symlink_is_replaced_not_followed(self):
        """job_index.json -> outside file: read as corrupt (not followed), rebuilt, and the
        write replaces the link; the outside file is unchanged."""
        outside = self.make_outside()
        before = snapshot_tree(outside)
        os.makedirs(self.data_dir)
        os.symlink(os.path.join(outside, "precious"), jobindex.index_path(self.data_dir))
        storage = self.make()
        self.append(storage, STREAM_STDOUT, rows(0, b"x"))
        self.successResultOf(storage.stop())
        self.assertFalse(os.path.islink(jobindex.index_path(self.data_dir)))
        self.assertIn(JOB, self.read_index()["jobs"])
        self.assertEqual(snapshot_tree(outside), before)

    def test_logs_top_symlink_is_refused(self):
        """``logs`` itself -> outside: appends are refused and nothing appears outside."""
        outside = self.make_outside()
        before = snapshot_tree(outside)
        os.makedirs(self.data_dir)
        os.symlink(outside, os.path.join(self.data_dir, "logs"))
        storage = self.make()
        self.failureResultOf(
            storage.append_logs(log_batch(JOB, STREAM_STDOUT, rows(0, b"x"))), safefs.UnsafeEntry
        )
        self.assertEqual(snapshot_tree(outside), before)
        self.assertRaises(safefs.UnsafeEntry, thd_remove_job, self.data_dir, JOB)
        self.assertEqual(snapshot_tree(outside), before)

    def test_pool_functions_refuse_links(self):
        """The blocking helpers: scan with repair, remove_file, probe: never through a link."""
        outside = self.make_outside()
        target = os.path.join(outside, "precious")
        before = snapshot_tree(outside)
        directory = os.path.join(self.data_dir, "logs", JOB)
        os.makedirs(directory)
        link = os.path.join(directory, segment.segment_name("stdout", 0))
        os.symlink(target, link)
        self.assertRaises(safefs.UnsafeEntry, segment.thd_scan_segment, link, True, 3)
        self.assertRaises(
            safefs.UnsafeEntry, segment.thd_append, link, b"x", 0, False, depth=3
        )
        scan = jobindex.thd_scan_job(self.data_dir, JOB, True)
        self.assertEqual(scan.refused, (link,))
        self.assertGreater(thd_remove_file(link), 0)
        self.assertFalse(os.path.lexists(link))
        probe = os.path.join(self.data_dir, space.PROBE_NAME)
        os.symlink(target, probe)
        self.assertTrue(space.thd_probe_disk(self.data_dir).writable)
        self.assertFalse(os.path.lexists(probe))
        self.assertEqual(snapshot_tree(outside), before)

    def test_queries_do_not_read_through_links_planted_after_load(self):
        """A loaded job whose segment, or whose directory, is swapped for a symlink to a
        copy elsewhere: the query is refused rather than reading the outside file."""
        storage = self.make()
        self.append(storage, STREAM_STDOUT, rows(0, b"inside"))
        snap = self.successResultOf(storage.open_job(JOB))
        directory = os.path.join(self.data_dir, "logs", JOB)
        outside = os.path.abspath(self.mktemp())
        import shutil

        shutil.copytree(directory, outside)
        path = os.path.join(directory, "stdout.log.gz")
        os.unlink(path)
        os.symlink(os.path.join(outside, "stdout.log.gz"), path)
        # Refused at the seam as StorageUnavailable, caused by the refused entry.
        e = self.assertRaises(StorageUnavailable, list, snap.iter_logs(0))
        self.assertIsInstance(e.__cause__, safefs.UnsafeEntry)
        os.unlink(path)
        os.rmdir(directory)
        os.symlink(outside, directory)
        e = self.assertRaises(StorageUnavailable, list, snap.iter_logs(0))
        self.assertIsInstance(e.__cause__, safefs.UnsafeEntry)
        os.unlink(directory)
        shutil.copytree(outside, directory)
        self.assertEqual([r.content for r in snap.iter_logs(0)], [b"inside"])

    def test_fifo_at_a_segment_name_is_not_waited_on(self):
        """A FIFO planted at a segment's name is refused at once, not opened and waited on."""
        directory = os.path.join(self.data_dir, "logs", JOB)
        os.makedirs(directory)
        fifo = os.path.join(directory, segment.segment_name("stdout", 0))
        os.mkfifo(fifo)
        self.assertRaises(safefs.UnsafeEntry, segment.thd_append, fifo, b"x", 0, False, depth=3)
        storage = self.make()
        self.append(storage, STREAM_STDOUT, rows(0, b"fresh"))
        self.assertEqual(self.logs(storage), [(1, b"fresh")])


class ModeTests(StorageTestCase):
    """New files are created 0640 and directories 0750, whatever the umask."""

    def setUp(self):
        super().setUp()
        old = os.umask(0)
        self.addCleanup(os.umask, old)

    def modes(self):
        found = {}
        for base, dirs, files in os.walk(self.data_dir):
            for name in dirs + files:
                path = os.path.join(base, name)
                found[os.path.relpath(path, self.data_dir)] = stat.S_IMODE(os.lstat(path).st_mode)
        found["."] = stat.S_IMODE(os.lstat(self.data_dir).st_mode)
        return found

    def test_default_modes_with_permissive_umask(self):
        """With umask 0: the data dir, job dirs and logs/ are 0750, segments and the index 0640."""
        storage = self.make(fsync="interval")
        self.append(storage, STREAM_STDOUT, rows(0, b"x"))
        self.successResultOf(storage.append_metrics(_metric_batch()))
        self.successResultOf(storage.stop())
        modes = self.modes()
        for path, mode in modes.items():
            full = os.path.join(self.data_dir, path)
            want = 0o750 if os.path.isdir(full) else 0o640
            self.assertEqual(mode, want, f"{path}: {mode:04o}")
        self.assertIn(os.path.join("logs", JOB, "stdout.log.gz"), modes)
        self.assertIn("job_index.json", modes)

    def test_configured_modes_and_group(self):
        """Configured modes and group apply to everything created."""
        gid = os.getgroups()[-1] if os.getgroups() else os.getgid()
        storage = self.make(modes=safefs.FileModes(0o600, 0o700, gid))
        self.append(storage, STREAM_STDOUT, rows(0, b"x"))
        self.successResultOf(storage.stop())
        for base, dirs, files in os.walk(self.data_dir):
            for name in dirs:
                st = os.lstat(os.path.join(base, name))
                self.assertEqual((stat.S_IMODE(st.st_mode), st.st_gid), (0o700, gid))
            for name in files:
                st = os.lstat(os.path.join(base, name))
                self.assertEqual((stat.S_IMODE(st.st_mode), st.st_gid), (0o600, gid))

    def test_existing_files_are_not_remoded(self):
        """A segment that exists already keeps its mode when appended to."""
        storage = self.make()
        self.append(storage, STREAM_STDOUT, rows(0, b"x"))
        path = os.path.join(self.data_dir, "logs", JOB, "stdout.log.gz")
        os.chmod(path, 0o600)
        self.append(storage, STREAM_STDOUT, rows(1, b"y"))
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)


def _metric_batch():
    return metric_batch(JOB, [(1000, 0, 1, metric_payload(JOB, 1000, 0))])


class ConfigTests(SynchronousTestCase):
    """storage.fileMode / dirMode / group parse, default, and refuse what is unsafe."""

    def test_defaults(self):
        """Omitted keys: 0640, 0750, no group."""
        cfg = config_module.config_from_string("storage: {}\n")
        self.assertEqual(
            (cfg.storage.file_mode, cfg.storage.dir_mode, cfg.storage.group), (0o640, 0o750, None)
        )

    def test_values(self):
        """Octal strings and a numeric group are read."""
        cfg = config_module.config_from_string(
            'storage: {fileMode: "0600", dirMode: "0700", group: 4242}\n'
        )
        self.assertEqual(
            (cfg.storage.file_mode, cfg.storage.dir_mode, cfg.storage.group), (0o600, 0o700, 4242)
        )

    def test_world_writable_refused(self):
        """A world-writable mode is an error naming the key."""
        for key in ("fileMode", "dirMode"):
            e = self.assertRaises(
                config_module.ConfigError,
                config_module.config_from_string,
                f'storage: {{{key}: "0666"}}\n',
            )
            self.assertIn(f"storage.{key}", str(e))

    def test_unknown_group_refused(self):
        """A group name that does not exist is an error naming the key."""
        e = self.assertRaises(
            config_module.ConfigError,
            config_module.config_from_string,
            "storage: {group: no-such-group-here}\n",
        )
        self.assertIn("storage.group", str(e))


class IndexAtStopTests(StorageTestCase):
    """The job index written at stop agrees with the files, even after outside damage."""

    def test_damage_under_a_running_storage(self):
        """A segment cut short and another job's directory removed while storage runs: the
        index written at stop equals a rebuild from the files (it kept the stale counts)."""
        storage = self.make(segment_max_bytes=1)
        for i in range(4):
            self.append(storage, STREAM_STDOUT, rows(i, b"line %d" % i, ts=1000 + i))
        self.append(storage, STREAM_STDOUT, rows(0, b"gone"), job=OTHER)
        self.successResultOf(storage.flush_index())
        # Outside damage: the last segment of JOB cut in half, OTHER's directory removed.
        last = os.path.join(self.data_dir, "logs", JOB, segment.segment_name("stdout", 3))
        os.truncate(last, os.path.getsize(last) // 2)
        import shutil

        shutil.rmtree(os.path.join(self.data_dir, "logs", OTHER))
        logged = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        self.successResultOf(storage.stop())
        written = jobindex.thd_load_parts(jobindex.index_path(self.data_dir))
        rebuilt, parts = jobindex._rebuild(self.data_dir)
        self.assertEqual(sorted(written[0]), sorted(rebuilt))
        self.assertEqual(sorted(written[0]), [JOB])
        keys = ("log_count", "metric_count", "size_bytes", "first_timestamp", "last_timestamp")
        for job, info in rebuilt.items():
            self.assertEqual(
                [getattr(written[0][job], k) for k in keys], [getattr(info, k) for k in keys]
            )
        self.assertEqual(written[0][JOB].log_count, 3)
        self.assertEqual(written[1], parts)
        self.assertTrue([e for e in logged if e.get("count") == 2 and "jobs" in e])

    def test_undamaged_stop_rescans_nothing(self):
        """Without damage the final write scans no job (sizes agree by lstat)."""
        storage = self.make()
        self.append(storage, STREAM_STDOUT, rows(0, b"x"))
        scans = []
        real = jobindex.thd_scan_job
        self.patch(jobindex, "thd_scan_job", lambda *a: scans.append(a) or real(*a))
        self.successResultOf(storage.stop())
        self.assertEqual(scans, [])
        self.assertEqual(self.read_index()["jobs"][JOB]["log_count"], 1)


class DataDirectoryLinkTests(StorageTestCase):
    """The data directory itself is the operator's choice and may be a symlink."""

    def test_data_directory_reached_through_a_link(self):
        """dataDir -> real directory: appends, queries (the walk, not the one-open fast
        path), deletion and a restart all work."""
        real = os.path.abspath(self.mktemp())
        os.makedirs(real)
        os.symlink(real, self.data_dir)
        storage = self.make()
        self.append(storage, STREAM_STDOUT, rows(0, b"a"))
        self.append(storage, STREAM_STDOUT, rows(1, b"b"), job=OTHER)
        storage = self.restart(storage)
        self.assertEqual(self.logs(storage), [(1, b"a")])
        self.successResultOf(storage.delete_job(OTHER))
        self.assertTrue(os.path.isfile(os.path.join(real, "logs", JOB, "stdout.log.gz")))
        self.assertFalse(os.path.lexists(os.path.join(real, "logs", OTHER)))


class SafeFsTests(SynchronousTestCase):
    """storage.safefs on its own."""

    def test_split_under(self):
        """The last ``depth`` components are split off; a short path walks what it has."""
        self.assertEqual(safefs.split_under("/d/logs/j/f", 3), ("/d", ["logs", "j", "f"]))
        self.assertEqual(safefs.split_under("a/b", 3), (".", ["a", "b"]))
        self.assertEqual(safefs.split_under("/a", 3), ("/", ["a"]))

    def test_open_dir_creates_with_modes(self):
        """Missing directories are created with the mode given, whatever the umask."""
        old = os.umask(0)
        self.addCleanup(os.umask, old)
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        created = []
        fd = safefs.open_dir(os.path.join(root, "a", "b"), 2, create=True,
                             modes=safefs.FileModes(0o600, 0o710), created=created)
        os.close(fd)
        self.assertEqual(created, [os.path.join(root, "a"), os.path.join(root, "a", "b")])
        for path in created:
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o710)
