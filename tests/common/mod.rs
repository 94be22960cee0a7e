//! Test harness: throwaway PostgreSQL clusters (initdb'd once per run into a template under
//! cargo's target tmp dir, then copied), archiver processes, and helpers. Everything a test starts
//! it stops by its own PID or data directory; everything it writes lives in its own temp dir.
#![allow(dead_code)]

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// The postgres user's uid/gid when running as root.
pub fn pg_ids() -> Option<(u32, u32)> {
    if !is_root() {
        return None;
    }
    let name = std::ffi::CString::new("postgres").unwrap();
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(
        !pw.is_null(),
        "running as root needs a `postgres` user to run PostgreSQL"
    );
    unsafe { Some(((*pw).pw_uid, (*pw).pw_gid)) }
}

/// PostgreSQL server binaries: $ARCHIVER_TEST_PG_BIN, else the newest /usr/lib/postgresql/*/bin.
pub fn pg_bin() -> PathBuf {
    if let Ok(p) = std::env::var("ARCHIVER_TEST_PG_BIN") {
        return PathBuf::from(p);
    }
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed (run scripts/test.sh)")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    dirs.sort();
    dirs.pop()
        .expect("no PostgreSQL server binaries under /usr/lib/postgresql")
        .1
}

/// A command run as the postgres user when we are root.
pub fn pg_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new(program);
    if let Some((uid, gid)) = pg_ids() {
        c.uid(uid).gid(gid);
        c.env("HOME", "/tmp");
    }
    c
}

pub fn chown_pg(p: &Path) {
    if let Some((uid, gid)) = pg_ids() {
        std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
    }
}

/// Asserts a command succeeded (naming it, its exit status and both outputs if not); its
/// output, for what the test reads next.
pub fn succeeded(out: Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// [`succeeded`], then its stdout.
pub fn must(out: Output, what: &str) -> String {
    String::from_utf8_lossy(&succeeded(out, what).stdout).into_owned()
}

/// Runs archiver with `args` and asserts it succeeded; its stdout.
pub fn archiver_ok(args: &[&str]) -> String {
    must(archiver(args), &format!("archiver {}", args.join(" ")))
}

/// Everything under `root` (not `root` itself; symlinks not followed): each entry's path
/// relative to `root` and its metadata, sorted by path. A missing `root` has nothing under it.
pub fn walk(root: &Path) -> Vec<(String, std::fs::Metadata)> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if m.is_dir() {
                todo.push(p.clone());
            }
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            out.push((rel, m));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// A temp directory every user can traverse (PostgreSQL runs as `postgres`).
pub struct TestDir {
    dir: tempfile::TempDir,
}

impl TestDir {
    pub fn new() -> TestDir {
        let dir = tempfile::Builder::new()
            .prefix("archiver-test-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        // Owned by postgres when root: a repository archiver creates here takes its owner, so
        // the restored clusters' restore_command (run as postgres) can read it.
        chown_pg(dir.path());
        TestDir { dir }
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    pub fn join(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
}

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn initdb(bin: &Path, dir: &Path) {
    let out = pg_command(bin.join("initdb"))
        .args([
            "--no-sync",
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
            "-D",
        ])
        .arg(dir)
        .output()
        .unwrap();
    must(out, "initdb");
}

/// One initdb per test run; clusters are copies of it (and so share a system identifier).
/// `None` when the postgres user cannot reach cargo's target directory (a checkout under a
/// private home, say): then every cluster gets its own initdb.
fn template() -> Option<&'static PathBuf> {
    static T: OnceLock<Option<PathBuf>> = OnceLock::new();
    T.get_or_init(|| {
        let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let reachable = pg_command("test")
            .arg("-x")
            .arg(&base)
            .status()
            .is_ok_and(|s| s.success());
        if !reachable {
            return None;
        }
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
        let dir = base.join(format!("pg-template-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        chown_pg(&dir);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        initdb(&pg_bin(), &dir);
        // Remove stale templates of earlier runs (ours are named by PID; only dead PIDs).
        if let Ok(rd) = std::fs::read_dir(&base) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name
                    .strip_prefix("pg-template-")
                    .and_then(|p| p.parse::<i32>().ok())
                {
                    if pid != std::process::id() as i32 && unsafe { libc::kill(pid, 0) } != 0 {
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
        }
        Some(dir)
    })
    .as_ref()
}

/// A throwaway PostgreSQL cluster on a free port.
pub struct Pg {
    /// The server binaries this cluster runs with.
    pub bin: PathBuf,
    pub data: PathBuf,
    pub port: u16,
    pub sock: PathBuf,
    pub log: PathBuf,
    running: bool,
}

pub const BASE_CONF: &str = "
listen_addresses = '127.0.0.1'
fsync = off
dynamic_shared_memory_type = mmap
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
wal_keep_size = '2GB'
shared_buffers = '32MB'
checkpoint_timeout = '30min'
max_wal_size = '2GB'
log_min_messages = info
";

impl Pg {
    /// A new cluster in `root/name` (not started). `conf` is appended to postgresql.conf;
    /// `hba` lines go before the template's trust lines (pg_hba is first-match).
    pub fn create(root: &TestDir, name: &str, conf: &str, hba: &str) -> Pg {
        Self::create_from(root, name, conf, hba, None)
    }

    /// Like `create`, but a fresh initdb: a cluster with its own system identifier.
    pub fn create_fresh(root: &TestDir, name: &str, conf: &str) -> Pg {
        Self::create_from(root, name, conf, "", Some(&pg_bin()))
    }

    /// A new cluster made by the `initdb` in `bin` (another major version).
    pub fn create_with_bin(root: &TestDir, name: &str, conf: &str, bin: &Path) -> Pg {
        let mut pg = Self::create_from(root, name, conf, "", Some(bin));
        pg.bin = bin.to_path_buf();
        pg
    }

    /// `initdb_bin`: run this initdb (a fresh system identifier) instead of copying the template.
    fn create_from(
        root: &TestDir,
        name: &str,
        conf: &str,
        hba: &str,
        initdb_bin: Option<&Path>,
    ) -> Pg {
        let data = root.join(name);
        match template().filter(|_| initdb_bin.is_none()) {
            Some(t) => {
                let out = Command::new("cp")
                    .arg("-a")
                    .arg(t)
                    .arg(&data)
                    .output()
                    .unwrap();
                must(out, "copying the template cluster");
            }
            None => {
                std::fs::create_dir(&data).unwrap();
                chown_pg(&data);
                std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
                initdb(initdb_bin.unwrap_or(&pg_bin()), &data);
            }
        }
        let sock = root.join(&format!("{name}-sock"));
        std::fs::create_dir_all(&sock).unwrap();
        chown_pg(&sock);
        let port = free_port();
        let mut c = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        c.push_str(BASE_CONF);
        c.push_str(&format!(
            "port = {port}\nunix_socket_directories = '{}'\n",
            sock.display()
        ));
        c.push_str(conf);
        std::fs::write(data.join("postgresql.conf"), c).unwrap();
        let old = std::fs::read_to_string(data.join("pg_hba.conf")).unwrap();
        std::fs::write(data.join("pg_hba.conf"), format!("{hba}\n{old}")).unwrap();
        let log = root.join(&format!("{name}.log"));
        Pg {
            bin: pg_bin(),
            data,
            port,
            sock,
            log,
            running: false,
        }
    }

    /// Adopts a data directory made by pg_basebackup (a standby), on a new port.
    pub fn adopt(root: &TestDir, name: &str, data: PathBuf) -> Pg {
        let sock = root.join(&format!("{name}-sock"));
        std::fs::create_dir_all(&sock).unwrap();
        chown_pg(&sock);
        let port = free_port();
        let mut c = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        c.push_str(&format!(
            "\nport = {port}\nunix_socket_directories = '{}'\n",
            sock.display()
        ));
        std::fs::write(data.join("postgresql.conf"), c).unwrap();
        Pg {
            bin: pg_bin(),
            data,
            port,
            sock,
            log: root.join(&format!("{name}.log")),
            running: false,
        }
    }

    /// A started standby of `primary`, made with `pg_basebackup -R`.
    pub fn standby_of(root: &TestDir, name: &str, primary: &Pg) -> Pg {
        let sdata = root.join(name);
        std::fs::create_dir(&sdata).unwrap();
        chown_pg(&sdata);
        std::fs::set_permissions(&sdata, std::fs::Permissions::from_mode(0o700)).unwrap();
        let out = pg_command(pg_bin().join("pg_basebackup"))
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-X",
                "stream",
                "-R",
                "-c",
                "fast",
                "-p",
            ])
            .arg(primary.port.to_string())
            .arg("-D")
            .arg(&sdata)
            .output()
            .unwrap();
        must(out, "pg_basebackup");
        let mut standby = Pg::adopt(root, name, sdata);
        standby.start();
        standby
    }

    /// Promotes a standby and waits until it accepts writes.
    pub fn promote(&self) {
        let out = pg_command(self.bin.join("pg_ctl"))
            .args(["-w", "-D"])
            .arg(&self.data)
            .arg("promote")
            .output()
            .unwrap();
        must(out, "pg_ctl promote");
        wait_until("promotion", Duration::from_secs(60), || {
            self.psql("select pg_is_in_recovery()") == "f"
        });
    }

    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        chown_pg(&self.log);
        drop(log);
        let out = pg_command(self.bin.join("pg_ctl"))
            .args(["-w", "-t", "60", "-D"])
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .arg("start")
            .output()
            .unwrap();
        if !out.status.success() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            panic!(
                "pg_ctl start failed: {}\n{log}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.running = true;
    }

    pub fn stop(&mut self) {
        if self.running {
            let _ = pg_command(self.bin.join("pg_ctl"))
                .args(["-w", "-t", "60", "-m", "fast", "-D"])
                .arg(&self.data)
                .arg("stop")
                .output();
            self.running = false;
        }
    }

    /// Stops the server as a crash would (`-m immediate`): nothing more is flushed.
    pub fn stop_immediate(&mut self) {
        if self.running {
            let _ = pg_command(self.bin.join("pg_ctl"))
                .args(["-w", "-t", "60", "-m", "immediate", "-D"])
                .arg(&self.data)
                .arg("stop")
                .output();
            self.running = false;
        }
    }

    pub fn conninfo(&self, user: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} sslmode=disable",
            self.port
        )
    }

    /// Runs SQL as postgres and returns unaligned, tuples-only output.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_db("postgres", sql)
    }

    /// [`Pg::psql`] in database `db`.
    pub fn psql_db(&self, db: &str, sql: &str) -> String {
        let out = Command::new("psql")
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                db,
                "-p",
            ])
            .arg(self.port.to_string())
            .arg("-c")
            .arg(sql)
            .output()
            .unwrap();
        must(out, &format!("psql {sql}")).trim().to_string()
    }

    fn pgbench_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("pgbench");
        c.args(["-h", "127.0.0.1", "-U", "postgres", "-p"])
            .arg(self.port.to_string())
            .args(args)
            .arg("postgres");
        c
    }

    pub fn pgbench(&self, args: &[&str]) {
        must(self.pgbench_cmd(args).output().unwrap(), "pgbench");
    }

    /// pgbench in the background (output discarded); wait on the child for its result.
    pub fn pgbench_background(&self, args: &[&str]) -> Child {
        self.pgbench_cmd(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    pub fn wal_dir(&self) -> PathBuf {
        self.data.join("pg_wal")
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        if self.running {
            let _ = pg_command(self.bin.join("pg_ctl"))
                .args(["-w", "-t", "30", "-m", "immediate", "-D"])
                .arg(&self.data)
                .arg("stop")
                .output();
        }
    }
}

pub fn archiver_bin() -> &'static str {
    env!("CARGO_BIN_EXE_archiver")
}

/// Runs archiver to completion (killed, and the test failed, after 60 s).
pub fn archiver(args: &[&str]) -> Output {
    archiver_cmd(Command::new(archiver_bin()).args(args))
}

/// Runs a prepared archiver command to completion with the harness's timeout.
pub fn archiver_cmd(cmd: &mut Command) -> Output {
    let mut child = cmd
        .env_remove("PGPASSWORD")
        .env("HOME", "/nonexistent")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drain the pipes in threads so a chatty child never blocks on a full pipe.
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t1 = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t2 = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            let err = String::from_utf8_lossy(&t2.join().unwrap()).into_owned();
            panic!("archiver {cmd:?} did not finish within 60 s:\n{err}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: t1.join().unwrap(),
        stderr: t2.join().unwrap(),
    }
}

/// A background `archiver` process with its stderr in a file.
pub struct Archiver {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Archiver {
    pub fn spawn(dir: &TestDir, name: &str, args: &[&str]) -> Archiver {
        Self::spawn_env(dir, name, args, &[])
    }

    pub fn spawn_env(dir: &TestDir, name: &str, args: &[&str], env: &[(&str, &str)]) -> Archiver {
        let log = dir.join(&format!("{name}.log"));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(archiver_bin())
            .args(args)
            .env_remove("PGPASSWORD")
            .env("HOME", "/nonexistent")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .unwrap();
        Archiver {
            child: Some(child),
            log,
        }
    }

    /// `archiver stream ARGS` (`--repo`/`--config`, `-d`, options), once its log says it is
    /// streaming.
    pub fn stream(dir: &TestDir, name: &str, args: &[&str]) -> Archiver {
        Self::stream_env(dir, name, args, &[])
    }

    /// [`Archiver::stream`] with extra environment.
    pub fn stream_env(dir: &TestDir, name: &str, args: &[&str], env: &[(&str, &str)]) -> Archiver {
        let mut a = Self::spawn_stream_env(dir, name, args, env);
        a.wait_log("streaming started", Duration::from_secs(60));
        a
    }

    /// `archiver stream ARGS` started, not waited for (it may be meant to fail).
    pub fn spawn_stream(dir: &TestDir, name: &str, args: &[&str]) -> Archiver {
        Self::spawn_stream_env(dir, name, args, &[])
    }

    fn spawn_stream_env(
        dir: &TestDir,
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Archiver {
        let all: Vec<&str> = std::iter::once("stream")
            .chain(args.iter().copied())
            .collect();
        Self::spawn_env(dir, name, &all, env)
    }

    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Waits until the log contains `needle`; panics (with the log) if the process exits first.
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) {
        let start = Instant::now();
        loop {
            if self.log_text().contains(needle) {
                return;
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "archiver exited ({st}) before logging {needle:?}:\n{}",
                    self.log_text()
                );
            }
            assert!(
                start.elapsed() < timeout,
                "timed out waiting for {needle:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// SIGTERM and wait.
    pub fn term(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait(Duration::from_secs(30))
    }

    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.as_mut().unwrap().wait();
    }

    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return st;
            }
            assert!(
                start.elapsed() < timeout,
                "archiver did not exit:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Archiver {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            if c.try_wait().ok().flatten().is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Archived complete segments of timeline `tli`, in order: (name, raw bytes, verified).
pub fn archived_segments(repo: &Path, tli: u32) -> Vec<(String, Vec<u8>)> {
    let dir = repo.join(format!("wal/{tli:08X}"));
    let mut names: Vec<String> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| n.ends_with(".zst") && !n.contains(".partial") && !n.starts_with('.'))
            .collect(),
        Err(_) => vec![],
    };
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let obj = std::fs::read(dir.join(&n)).unwrap();
            let (raw, _) = archiver::decode_bytes(&obj).expect("archived object verifies");
            (n.trim_end_matches(".zst").to_string(), raw)
        })
        .collect()
}

/// Asserts the archived segments of `tli` are consecutive and byte-identical to the server's
/// copies still in `wal_dir`; returns how many were compared.
pub fn assert_segments_match(repo: &Path, tli: u32, wal_dir: &Path) -> usize {
    let segs = archived_segments(repo, tli);
    assert!(!segs.is_empty(), "no archived segments on timeline {tli}");
    let segno = |n: &str| {
        u64::from_str_radix(&n[8..16], 16).unwrap() * 256
            + u64::from_str_radix(&n[16..24], 16).unwrap()
    };
    for w in segs.windows(2) {
        assert_eq!(
            segno(&w[1].0),
            segno(&w[0].0) + 1,
            "gap between {} and {}",
            w[0].0,
            w[1].0
        );
    }
    let mut compared = 0;
    for (name, raw) in &segs {
        assert_eq!(raw.len(), 16 << 20, "{name} has the wrong size");
        if let Ok(server) = std::fs::read(wal_dir.join(name)) {
            assert!(server == *raw, "archived {name} differs from the server's");
            compared += 1;
        }
    }
    compared
}

/// Current WAL insert position's segment file name.
pub fn current_walfile(pg: &Pg) -> String {
    pg.psql("select pg_walfile_name(pg_current_wal_lsn())")
}

/// Waits until `repo` holds a complete segment named `name` (on its timeline).
pub fn wait_archived(repo: &Path, name: &str, timeout: Duration) {
    let tli = &name[0..8];
    let p = repo.join(format!("wal/{tli}/{name}.zst"));
    wait_until(&format!("{name} archived"), timeout, || p.exists());
}

/// A moto S3 API server on a free port (`ARCHIVER_TEST_MOTO`, installed by scripts/test.sh),
/// stopped by its PID when dropped.
pub struct Moto {
    child: Child,
    pub endpoint: String,
}

impl Moto {
    /// None when no moto is installed (the caller says the test is skipped).
    pub fn start() -> Option<Moto> {
        Self::start_with_env(&[])
    }

    /// With extra environment for the server (e.g. `INITIAL_NO_AUTH_ACTION_COUNT=0`, which makes
    /// moto check credentials).
    pub fn start_with_env(env: &[(&str, &str)]) -> Option<Moto> {
        Self::start_on(free_port(), env)
    }

    /// On a given port (a test that configures the endpoint before the server exists).
    pub fn start_on(port: u16, env: &[(&str, &str)]) -> Option<Moto> {
        let bin = std::env::var("ARCHIVER_TEST_MOTO")
            .ok()
            .filter(|v| !v.is_empty())?;
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let m = Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        wait_until("moto_server", Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Some(m)
    }

    /// An S3 client for it (test credentials, path-style).
    pub fn client(&self) -> aws_sdk_s3::Client {
        let conf = aws_sdk_s3::config::Builder::new()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_s3::config::Credentials::new(
                "test", "test", None, None, "test",
            ))
            .endpoint_url(&self.endpoint)
            .force_path_style(true)
            .build();
        aws_sdk_s3::Client::from_conf(conf)
    }
}

impl Moto {
    /// Creates a bucket (with Object Lock enabled when `locked`).
    pub async fn bucket(&self, name: &str, locked: bool) -> aws_sdk_s3::Client {
        let client = self.client();
        client
            .create_bucket()
            .bucket(name)
            .set_object_lock_enabled_for_bucket(locked.then_some(true))
            .send()
            .await
            .unwrap();
        client
    }
}

/// Every key in `bucket` under `prefix`, in order (all pages).
pub async fn bucket_keys(client: &aws_sdk_s3::Client, bucket: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut pages = client
        .list_objects_v2()
        .bucket(bucket)
        .prefix(prefix)
        .into_paginator()
        .send();
    while let Some(p) = pages.next().await {
        for o in p.unwrap().contents() {
            out.push(o.key().unwrap().to_string());
        }
    }
    out
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a data directory `archiver restore` (or a test) prepared for recovery, on a free port,
/// and waits until it is promoted. The server runs `restore_command` as the postgres user, so
/// the binary named there is swapped for a copy in `root` it can execute.
pub fn start_recovering(root: &TestDir, name: &str, pgdata: PathBuf, bin: Option<&Path>) -> Pg {
    let copy = root.join("archiver-bin");
    if !copy.exists() {
        std::fs::copy(archiver_bin(), &copy).unwrap();
    }
    let conf = pgdata.join("postgresql.auto.conf");
    let text = std::fs::read_to_string(&conf).unwrap_or_default();
    std::fs::write(&conf, text.replace(archiver_bin(), copy.to_str().unwrap())).unwrap();
    let mut pg = Pg::adopt(root, name, pgdata);
    if let Some(b) = bin {
        pg.bin = b.to_path_buf();
    }
    pg.start();
    wait_until(
        "the restored cluster is promoted",
        Duration::from_secs(60),
        || pg.psql("select pg_is_in_recovery()") == "f",
    );
    pg
}

/// A cluster with `archiver stream` running into a local repository and streaming: the
/// starting point of most end-to-end tests. Dropped in field order: the streamer, the server,
/// then the directory.
pub struct Streaming {
    pub streamer: Archiver,
    pub pg: Pg,
    /// The repository directory, and the same as a `&str` argument.
    pub repo: PathBuf,
    pub r: String,
    /// The server's conninfo (user `postgres`).
    pub ci: String,
    pub dir: TestDir,
}

impl Streaming {
    /// A new cluster (`conf` added to its postgresql.conf) with a streamer given `extra`
    /// options.
    pub fn start(conf: &str, extra: &[&str]) -> Streaming {
        let dir = TestDir::new();
        let mut pg = Pg::create(&dir, "pg", conf, "");
        pg.start();
        Self::on(dir, pg, extra)
    }

    /// `archiver backup` (checkpoint fast) into the repository; its id.
    pub fn backup(&self) -> String {
        let args = [
            "backup",
            "--repo",
            &self.r,
            "-d",
            &self.ci,
            "--checkpoint",
            "fast",
        ];
        archiver_ok(&args).trim().to_string()
    }

    /// A streamer into `dir/repo` from the running `pg`.
    pub fn on(dir: TestDir, pg: Pg, extra: &[&str]) -> Streaming {
        let repo = dir.join("repo");
        let r = repo.to_str().unwrap().to_string();
        let ci = pg.conninfo("postgres");
        let mut args = vec!["--repo", r.as_str(), "-d", ci.as_str()];
        args.extend_from_slice(extra);
        let streamer = Archiver::stream(&dir, "stream", &args);
        Streaming {
            streamer,
            pg,
            repo,
            r,
            ci,
            dir,
        }
    }
}

/// A TCP proxy in front of the S3 server that passes everything through and keeps every byte
/// clients sent (request heads and bodies, in arrival order per connection). Stops with the
/// test.
pub struct RecordingProxy {
    pub endpoint: String,
    connections: std::sync::Arc<std::sync::Mutex<Vec<Recorded>>>,
}

type Recorded = std::sync::Arc<std::sync::Mutex<Vec<u8>>>;

impl RecordingProxy {
    pub fn start(upstream: &str) -> RecordingProxy {
        use std::io::{Read, Write};
        use std::net::{Shutdown, TcpListener, TcpStream};
        let up = upstream.trim_start_matches("http://").to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let connections = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let all = connections.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let (Ok(client), Ok(server)) = (client, TcpStream::connect(&up)) else {
                    continue;
                };
                let rec = Recorded::default();
                all.lock().unwrap().push(rec.clone());
                let pipe = |mut from: TcpStream, mut to: TcpStream, rec: Option<Recorded>| {
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 << 10];
                        while let Ok(n @ 1..) = from.read(&mut buf) {
                            if let Some(r) = &rec {
                                r.lock().unwrap().extend_from_slice(&buf[..n]);
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(Shutdown::Write);
                    })
                };
                pipe(
                    client.try_clone().unwrap(),
                    server.try_clone().unwrap(),
                    Some(rec),
                );
                pipe(server, client, None);
            }
        });
        RecordingProxy {
            endpoint,
            connections,
        }
    }

    /// The value of header `name` (lower case, as hyper sends it) in every request with
    /// `method` that clients sent so far ("" where a request has none).
    pub fn header_of(&self, method: &str, name: &str) -> Vec<String> {
        let mut out = Vec::new();
        for conn in self.connections.lock().unwrap().iter() {
            let sent = conn.lock().unwrap();
            let text = String::from_utf8_lossy(&sent);
            for head in text.split(&format!("{method} /")).skip(1) {
                let head = head.split("\r\n\r\n").next().unwrap_or("");
                let want = format!("\r\n{name}: ");
                out.push(
                    head.split(&want)
                        .nth(1)
                        .map(|v| v.split("\r\n").next().unwrap_or("").to_string())
                        .unwrap_or_default(),
                );
            }
        }
        out
    }
}

/// A TCP proxy in front of the S3 server that misbehaves: every third connection answers its
/// first request with 503 SlowDown or 500 InternalError, is dropped at once, or is cut after
/// some bytes (in turn); every third is delayed; every proxied connection also lives at most a
/// second or two, so faults keep coming on fresh connections. Stops with the test.
pub struct FaultyProxy {
    pub endpoint: String,
    pub faults: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub connections: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FaultyProxy {
    pub fn start(upstream: &str) -> FaultyProxy {
        use std::io::{Read, Write};
        use std::net::{Shutdown, TcpListener, TcpStream};
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        let up = upstream.trim_start_matches("http://").to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let faults = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicU64::new(0));
        let (f, s, c) = (faults.clone(), stop.clone(), connections.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let (client, _) = match listener.accept() {
                    Ok(c) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                client.set_nonblocking(false).unwrap();
                let (f, up, conns) = (f.clone(), up.clone(), c.clone());
                std::thread::spawn(move || {
                    let mut client = client;
                    // Every third connection fails, cycling through the kinds; every third is
                    // delayed; the rest pass (then maybe cut).
                    let n = conns.fetch_add(1, Ordering::Relaxed);
                    let roll = match (n % 3, (n / 3) % 4) {
                        (0, 0) => 0,
                        (0, 1) => 10,
                        (0, 2) => 17,
                        (0, _) => 36, // passes, then cut below
                        (1, _) => 23,
                        _ => 99,
                    };
                    let answer = |client: &mut TcpStream, status: &str, code: &str| {
                        // Read the request head, answer, close: the request never reaches S3.
                        let mut head = Vec::new();
                        let mut b = [0u8; 1];
                        while !head.ends_with(b"\r\n\r\n") && client.read(&mut b).unwrap_or(0) == 1
                        {
                            head.push(b[0]);
                        }
                        let body = format!("<?xml version=\"1.0\"?><Error><Code>{code}</Code><Message>injected</Message></Error>");
                        let _ = write!(client, "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                        let _ = client.shutdown(Shutdown::Both);
                    };
                    match roll {
                        0..=9 => {
                            f.fetch_add(1, Ordering::Relaxed);
                            return answer(&mut client, "503 Slow Down", "SlowDown");
                        }
                        10..=16 => {
                            f.fetch_add(1, Ordering::Relaxed);
                            return answer(
                                &mut client,
                                "500 Internal Server Error",
                                "InternalError",
                            );
                        }
                        17..=22 => {
                            f.fetch_add(1, Ordering::Relaxed);
                            let _ = client.shutdown(Shutdown::Both);
                            return;
                        }
                        23..=35 => {
                            f.fetch_add(1, Ordering::Relaxed);
                            std::thread::sleep(Duration::from_millis(fastrand::u64(200..800)));
                        }
                        _ => {}
                    }
                    let Ok(server) = TcpStream::connect(&up) else {
                        return;
                    };
                    // Cut after some bytes (mid-request or mid-response) for a share of the rest.
                    let cut_after = (roll == 36).then(|| fastrand::u64(2_000..400_000));
                    if cut_after.is_some() {
                        f.fetch_add(1, Ordering::Relaxed);
                    }
                    let lifetime = Duration::from_millis(fastrand::u64(300..2000));
                    let pipe = |mut from: TcpStream, mut to: TcpStream, limit: Option<u64>| {
                        std::thread::spawn(move || {
                            let start = Instant::now();
                            let _ = from.set_read_timeout(Some(Duration::from_millis(100)));
                            let mut buf = vec![0u8; 64 << 10];
                            let mut n_total = 0u64;
                            loop {
                                if start.elapsed() > lifetime {
                                    break;
                                }
                                match from.read(&mut buf) {
                                    Ok(0) => break,
                                    Ok(n) => {
                                        n_total += n as u64;
                                        if limit.is_some_and(|l| n_total > l) {
                                            break;
                                        }
                                        if to.write_all(&buf[..n]).is_err() {
                                            break;
                                        }
                                    }
                                    Err(e)
                                        if e.kind() == std::io::ErrorKind::WouldBlock
                                            || e.kind() == std::io::ErrorKind::TimedOut =>
                                    {
                                        continue
                                    }
                                    Err(_) => break,
                                }
                            }
                            let _ = from.shutdown(Shutdown::Both);
                            let _ = to.shutdown(Shutdown::Both);
                        })
                    };
                    let a = pipe(
                        client.try_clone().unwrap(),
                        server.try_clone().unwrap(),
                        cut_after,
                    );
                    let b = pipe(server, client, None);
                    let _ = a.join();
                    let _ = b.join();
                });
            }
        });
        FaultyProxy {
            endpoint,
            faults,
            connections,
            stop,
        }
    }
}

impl Drop for FaultyProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Server binaries of another major that scripts/test.sh fetched
/// (`ARCHIVER_TEST_PG<major>_BIN`), if any.
pub fn pg_bin_of_major(major: u32) -> Option<PathBuf> {
    std::env::var(format!("ARCHIVER_TEST_PG{major}_BIN"))
        .ok()
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// A checksum of pgbench's accounts and the test table `t (id, v)`: what a restore must bring
/// back exactly.
pub fn accounts_and_t(pg: &Pg) -> String {
    pg.psql(
        "select (select md5(string_agg(aid || ':' || abalance, ',' order by aid)) from pgbench_accounts) \
         || '/' || (select md5(coalesce(string_agg(id || ':' || v, ',' order by id), '')) from t)",
    )
}

/// `archiver drill --json` of repository `r` with the server binaries in `bin`, run by the copy
/// of archiver in `dir` the postgres user can execute (it becomes the drill's
/// restore_command; [`start_recovering`] made it), in a new scratch directory, which must be
/// left empty. Its result.
pub fn drill_with(dir: &TestDir, r: &str, bin: &Path) -> serde_json::Value {
    let scratch = dir.join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let out = succeeded(
        archiver_cmd(
            Command::new(dir.join("archiver-bin"))
                .args(["drill", "--repo", r, "--json", "--pg-bin"])
                .arg(bin)
                .arg("--scratch")
                .arg(&scratch),
        ),
        "archiver drill",
    );
    assert_eq!(
        std::fs::read_dir(&scratch).unwrap().count(),
        0,
        "the drill leaves nothing"
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The numeric fields of the first log line (text format) whose message is `message`:
/// `… message a=1 b=2` gives {a: 1, b: 2}.
pub fn log_numbers(log: &str, message: &str) -> std::collections::HashMap<String, u64> {
    let line = log
        .lines()
        .find(|l| l.contains(&format!(" {message} ")))
        .unwrap_or_else(|| panic!("no {message:?} line in the log:\n{log}"));
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect()
}
