//! Authentication methods and TLS modes against a real server.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

const HBA: &str = "
hostssl replication tls_user 127.0.0.1/32 scram-sha-256
host replication tls_user 127.0.0.1/32 reject
host replication scram_user 127.0.0.1/32 scram-sha-256
host replication md5_user 127.0.0.1/32 md5
host replication pw_user 127.0.0.1/32 password
";

/// A CA and a server certificate for `localhost` signed by it, owned by postgres.
fn make_certs(dir: &TestDir) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let d = dir.join("certs");
    std::fs::create_dir(&d).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&d)
            .output()
            .unwrap();
        must(out, &format!("openssl {args:?}"));
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=archiver test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(
        d.join("ext.cnf"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "server.crt",
    ]);
    for f in ["server.key", "server.crt"] {
        chown_pg(&d.join(f));
        std::fs::set_permissions(
            d.join(f),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
    }
    (d.join("ca.crt"), d.join("server.crt"), d.join("server.key"))
}

fn cluster(dir: &TestDir) -> (Pg, std::path::PathBuf) {
    let (ca, crt, key) = make_certs(dir);
    let conf = format!(
        "max_replication_slots = 30\nssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
        crt.display(),
        key.display()
    );
    let mut pg = Pg::create(dir, "pg", &conf, HBA);
    pg.start();
    pg.psql("create role scram_user login replication password 'scram-pw'");
    pg.psql("create role tls_user login replication password 'tls-pw'");
    pg.psql(
        "set password_encryption = 'md5'; create role md5_user login replication password 'md5-pw'",
    );
    pg.psql("create role pw_user login replication password 'plain-pw'");
    pg.psql("create role norepl login");
    (pg, ca)
}

/// Starts a streamer, waits until it streams, stops it; returns its log.
fn streams_ok(dir: &TestDir, name: &str, conninfo: &str, env: &[(&str, &str)]) -> String {
    streams_ok_then(dir, name, conninfo, env, &|| {})
}

/// Like `streams_ok`, running `check` while the streamer is connected.
fn streams_ok_then(
    dir: &TestDir,
    name: &str,
    conninfo: &str,
    env: &[(&str, &str)],
    check: &dyn Fn(),
) -> String {
    let repo = dir.join(&format!("repo-{name}"));
    let mut a = Archiver::stream_env(
        dir,
        name,
        &[
            "--repo",
            repo.to_str().unwrap(),
            "-d",
            conninfo,
            "--slot",
            name,
        ],
        env,
    );
    check();
    let st = a.term();
    assert!(st.success(), "{name}: exit {st}\n{}", a.log_text());
    a.log_text()
}

fn fails(dir: &TestDir, name: &str, conninfo: &str, needle: &str) {
    let repo = dir.join(&format!("repo-{name}"));
    let out = archiver(&[
        "stream",
        "--repo",
        repo.to_str().unwrap(),
        "-d",
        conninfo,
        "--slot",
        name,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{name}: {err}");
    assert!(
        err.contains(needle),
        "{name}: expected {needle:?} in:\n{err}"
    );
    assert!(
        !Path::new(&repo).exists(),
        "{name}: a refused run must not create the repository"
    );
}

#[test]
fn auth_methods_and_tls_modes() {
    let dir = TestDir::new();
    let (pg, ca) = cluster(&dir);
    let p = pg.port;
    let ca = ca.display();

    // trust, SCRAM, md5, cleartext password.
    streams_ok(&dir, "trust", &pg.conninfo("postgres"), &[]);
    let log = streams_ok(
        &dir,
        "scram",
        &format!("postgresql://scram_user:scram-pw@127.0.0.1:{p}/?sslmode=disable"),
        &[],
    );
    assert!(
        !log.contains("scram-pw"),
        "the password leaked into the log"
    );
    streams_ok(
        &dir,
        "md5",
        &format!("host=127.0.0.1 port={p} user=md5_user password=md5-pw sslmode=disable"),
        &[],
    );
    streams_ok(
        &dir,
        "pw",
        &format!("host=127.0.0.1 port={p} user=pw_user sslmode=disable"),
        &[("PGPASSWORD", "plain-pw")],
    );

    // ~/.pgpass-style file through PGPASSFILE, matching the `replication` database.
    let passfile = dir.join("pgpass");
    std::fs::write(
        &passfile,
        format!("127.0.0.1:{p}:replication:scram_user:scram-pw\n"),
    )
    .unwrap();
    std::fs::set_permissions(
        &passfile,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    streams_ok(
        &dir,
        "pgpass",
        &format!("host=127.0.0.1 port={p} user=scram_user sslmode=disable"),
        &[("PGPASSFILE", passfile.to_str().unwrap())],
    );

    // TLS: prefer (the default) and require encrypt without verification, verify-ca checks the
    // chain (connecting by IP), verify-full also the name. The server confirms TLS is in use.
    let ssl_in_use = |slot: &str| {
        pg.psql(&format!(
            "select s.ssl from pg_stat_ssl s join pg_replication_slots r on r.active_pid = s.pid where r.slot_name = '{slot}'"
        ))
    };
    for (name, mode) in [("tls_prefer", ""), ("tls_require", "sslmode=require")] {
        let ci = format!("host=127.0.0.1 port={p} user=tls_user password=tls-pw {mode}");
        let log = streams_ok_then(&dir, name, &ci, &[], &|| {
            assert_eq!(
                ssl_in_use(name),
                "t",
                "{name}: the walsender connection must use TLS"
            );
            // WAL flows through the session taken off the runtime (read in batches).
            pg.psql(&format!(
                "create table {name}(x int); insert into {name} select generate_series(1, 50000)"
            ));
            let seg = current_walfile(&pg);
            pg.psql("select pg_switch_wal()");
            wait_archived(
                &dir.join(&format!("repo-{name}")),
                &seg,
                std::time::Duration::from_secs(60),
            );
        });
        assert!(
            log.contains("on a thread of its own, reading its socket in batches"),
            "{name}: a TLS stream is detached too\n{log}"
        );
    }
    // Over the Unix socket libpq never uses TLS; neither do we (even with sslmode=require).
    streams_ok(
        &dir,
        "unix_socket",
        &format!(
            "host={} port={p} user=postgres sslmode=require",
            pg.sock.display()
        ),
        &[],
    );
    streams_ok(&dir, "tls_verify_ca", &format!("host=127.0.0.1 port={p} user=tls_user password=tls-pw sslmode=verify-ca sslrootcert={ca}"), &[]);
    streams_ok(&dir, "tls_verify_full", &format!("host=localhost port={p} user=tls_user password=tls-pw sslmode=verify-full sslrootcert={ca}"), &[]);
    // Environment variables as libpq reads them.
    streams_ok(
        &dir,
        "tls_env",
        "",
        &[
            ("PGHOST", "127.0.0.1"),
            ("PGPORT", &p.to_string()),
            ("PGUSER", "tls_user"),
            ("PGPASSWORD", "tls-pw"),
            ("PGSSLMODE", "require"),
        ],
    );

    // Refusals: wrong password, no password, no REPLICATION, TLS required by pg_hba,
    // verify-full against a name the certificate does not carry, an untrusted CA.
    fails(
        &dir,
        "bad_scram",
        &format!("host=127.0.0.1 port={p} user=scram_user password=wrong sslmode=disable"),
        "password authentication failed",
    );
    fails(
        &dir,
        "bad_md5",
        &format!("host=127.0.0.1 port={p} user=md5_user password=wrong sslmode=disable"),
        "password authentication failed",
    );
    fails(
        &dir,
        "no_pw",
        &format!("host=127.0.0.1 port={p} user=scram_user sslmode=disable"),
        "none was given",
    );
    fails(
        &dir,
        "norepl",
        &format!("host=127.0.0.1 port={p} user=norepl sslmode=disable"),
        "REPLICATION",
    );
    fails(
        &dir,
        "tls_off",
        &format!("host=127.0.0.1 port={p} user=tls_user password=tls-pw sslmode=disable"),
        "pg_hba.conf",
    );
    fails(&dir, "tls_name", &format!("host=127.0.0.1 port={p} user=tls_user password=tls-pw sslmode=verify-full sslrootcert={ca}"), "TLS");
    let other_ca = dir.join("certs/server.crt");
    fails(&dir, "tls_ca", &format!("host=localhost port={p} user=tls_user password=tls-pw sslmode=verify-full sslrootcert={}", other_ca.display()), "TLS");
    // `archiver backup` refuses a user without REPLICATION the same way, creating nothing.
    let repo = dir.join("repo-norepl-backup");
    let out = archiver(&[
        "backup",
        "--repo",
        repo.to_str().unwrap(),
        "-d",
        &format!("host=127.0.0.1 port={p} user=norepl sslmode=disable"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("REPLICATION"), "{err}");
    assert!(!repo.exists());
    // The password never appears in errors.
    let out = archiver(&[
        "stream",
        "--repo",
        dir.join("r").to_str().unwrap(),
        "-d",
        &format!("postgresql://scram_user:s3cr3t-value@127.0.0.1:{p}/?sslmode=disable"),
    ]);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("s3cr3t-value"));
}
