//! Connection strings as PostgreSQL's tools take them (libpq's `conninfo_parse` and
//! `conninfo_uri_parse` in `fe-connect.c`): a `postgresql://` URI or `key=value` pairs, then the
//! standard `PG*` environment variables, then defaults; and `~/.pgpass` (`passwordFromFile`).
//!
//! Invariant: the password is held in a [`Secret`] whose `Debug`/`Display` never print it, and
//! [`ConnInfo::display_target`] (what logs and errors show) never contains it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A string that never prints itself.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"********\"")
    }
}

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl std::str::FromStr for SslMode {
    type Err = ConnInfoError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(ConnInfoError(format!(
                    "invalid sslmode value: \"{other}\" (expected disable, allow, prefer, require, verify-ca or verify-full)"
                )))
            }
        })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid connection string: {0}")]
pub struct ConnInfoError(pub String);

/// One address to try: a TCP host or a Unix-socket directory, and a port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Tcp { host: String, port: u16 },
    Unix { dir: PathBuf, port: u16 },
}

impl Target {
    /// The host name as `.pgpass` and TLS see it.
    pub fn host_name(&self) -> &str {
        match self {
            Target::Tcp { host, .. } => host,
            Target::Unix { .. } => "localhost",
        }
    }
    pub fn port(&self) -> u16 {
        match self {
            Target::Tcp { port, .. } | Target::Unix { port, .. } => *port,
        }
    }
    pub fn socket_path(&self) -> Option<PathBuf> {
        match self {
            Target::Unix { dir, port } => Some(dir.join(format!(".s.PGSQL.{port}"))),
            Target::Tcp { .. } => None,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Target::Tcp { host, port } => write!(f, "{host}:{port}"),
            Target::Unix { .. } => write!(f, "{}", self.socket_path().unwrap().display()),
        }
    }
}

/// A fully resolved connection specification.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub targets: Vec<Target>,
    pub user: String,
    pub password: Option<Secret>,
    pub dbname: String,
    pub passfile: Option<PathBuf>,
    pub sslmode: SslMode,
    pub sslrootcert: Option<String>,
    pub sslcert: Option<PathBuf>,
    pub sslkey: Option<PathBuf>,
    pub application_name: Option<String>,
    pub connect_timeout: Option<Duration>,
}

/// libpq options we accept and ignore (they do not apply to a physical replication client).
const IGNORED_KEYS: &[&str] = &[
    "replication",
    "options",
    "target_session_attrs",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "client_encoding",
    "gssencmode",
    "krbsrvname",
    "gsslib",
    "sslcompression",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "sslpassword",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "requirepeer",
    "channel_binding",
    "load_balance_hosts",
];

const KNOWN_KEYS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "user",
    "password",
    "dbname",
    "passfile",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "application_name",
    "fallback_application_name",
    "connect_timeout",
];

/// Environment lookups, injectable for tests.
pub trait Env {
    fn var(&self, key: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, key: &str) -> Option<String> {
        std::env::var(key).ok().filter(|v| !v.is_empty())
    }
}

impl ConnInfo {
    /// Parses `s` (URI or key=value; `None` = empty), then fills gaps from `env` and defaults.
    pub fn parse(s: Option<&str>, env: &dyn Env) -> Result<ConnInfo, ConnInfoError> {
        let s = s.unwrap_or("").trim();
        let mut kv = if s.starts_with("postgresql://") || s.starts_with("postgres://") {
            parse_uri(s)?
        } else {
            parse_kv(s)?
        };
        for k in kv.keys() {
            if !KNOWN_KEYS.contains(&k.as_str()) && !IGNORED_KEYS.contains(&k.as_str()) {
                return Err(ConnInfoError(format!("invalid connection option \"{k}\"")));
            }
        }
        if let Some(addr) = kv.remove("hostaddr") {
            kv.entry("host".into()).or_insert(addr);
        }
        let from_env = |key: &str, var: &str, kv: &mut BTreeMap<String, String>| {
            if !kv.contains_key(key) {
                if let Some(v) = env.var(var) {
                    kv.insert(key.to_string(), v);
                }
            }
        };
        for (key, var) in [
            ("host", "PGHOST"),
            ("host", "PGHOSTADDR"),
            ("port", "PGPORT"),
            ("user", "PGUSER"),
            ("password", "PGPASSWORD"),
            ("dbname", "PGDATABASE"),
            ("passfile", "PGPASSFILE"),
            ("sslmode", "PGSSLMODE"),
            ("sslrootcert", "PGSSLROOTCERT"),
            ("sslcert", "PGSSLCERT"),
            ("sslkey", "PGSSLKEY"),
            ("application_name", "PGAPPNAME"),
            ("connect_timeout", "PGCONNECT_TIMEOUT"),
        ] {
            from_env(key, var, &mut kv);
        }

        let hosts: Vec<String> = match kv.get("host") {
            Some(h) => h.split(',').map(|s| s.trim().to_string()).collect(),
            None => vec![default_socket_dir()],
        };
        let ports: Vec<u16> = match kv.get("port") {
            Some(p) => p
                .split(',')
                .map(|p| {
                    let p = p.trim();
                    if p.is_empty() {
                        return Ok(5432);
                    }
                    p.parse::<u16>()
                        .ok()
                        .filter(|p| *p != 0)
                        .ok_or_else(|| ConnInfoError(format!("invalid port number: \"{p}\"")))
                })
                .collect::<Result<_, _>>()?,
            None => vec![5432],
        };
        if ports.len() != 1 && ports.len() != hosts.len() {
            return Err(ConnInfoError(format!(
                "could not match {} port numbers to {} hosts",
                ports.len(),
                hosts.len()
            )));
        }
        let targets = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let port = if ports.len() == 1 { ports[0] } else { ports[i] };
                let h = if h.is_empty() {
                    default_socket_dir()
                } else {
                    h.clone()
                };
                if h.starts_with('/') || h.starts_with('@') {
                    Target::Unix {
                        dir: PathBuf::from(h),
                        port,
                    }
                } else {
                    Target::Tcp { host: h, port }
                }
            })
            .collect();

        let user = match kv.get("user") {
            Some(u) => u.clone(),
            None => os_user_name().ok_or_else(|| {
                ConnInfoError("no user name given and the OS user could not be determined".into())
            })?,
        };
        let dbname = kv.get("dbname").cloned().unwrap_or_else(|| user.clone());
        let sslmode = match kv.get("sslmode") {
            Some(m) => m.parse()?,
            None => SslMode::Prefer,
        };
        let connect_timeout = match kv.get("connect_timeout") {
            Some(t) => {
                let secs: i64 = t.trim().parse().map_err(|_| {
                    ConnInfoError(format!("invalid connect_timeout value: \"{t}\""))
                })?;
                // libpq: zero or negative means wait forever; 1 is raised to 2.
                (secs > 0).then(|| Duration::from_secs(secs.max(2) as u64))
            }
            None => None,
        };
        let home = env.var("HOME").map(PathBuf::from);
        let passfile = kv
            .get("passfile")
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(".pgpass")));
        let pg_dir_file = |name: &str| {
            home.as_ref()
                .map(|h| h.join(".postgresql").join(name))
                .filter(|p| p.exists())
        };
        Ok(ConnInfo {
            targets,
            user,
            password: kv.get("password").map(|p| Secret::new(p.clone())),
            dbname,
            passfile,
            sslmode,
            sslrootcert: kv
                .get("sslrootcert")
                .cloned()
                .or_else(|| pg_dir_file("root.crt").map(|p| p.to_string_lossy().into_owned())),
            sslcert: kv
                .get("sslcert")
                .map(PathBuf::from)
                .or_else(|| pg_dir_file("postgresql.crt")),
            sslkey: kv
                .get("sslkey")
                .map(PathBuf::from)
                .or_else(|| pg_dir_file("postgresql.key")),
            application_name: kv
                .get("application_name")
                .or_else(|| kv.get("fallback_application_name"))
                .cloned(),
            connect_timeout,
        })
    }

    /// What logs and errors may show: user and addresses, never the password.
    pub fn display_target(&self) -> String {
        let t: Vec<String> = self.targets.iter().map(|t| t.to_string()).collect();
        format!("user={} at {}", self.user, t.join(","))
    }

    /// The password for `target`: explicit, then `PGPASSWORD` (already merged), then the password file.
    /// Physical replication connections match the database name `replication` in `.pgpass`.
    pub fn password_for(&self, target: &Target) -> Option<Secret> {
        if let Some(p) = &self.password {
            return Some(p.clone());
        }
        let file = self.passfile.as_ref()?;
        pgpass_lookup(
            file,
            target.host_name(),
            target.port(),
            "replication",
            &self.user,
        )
        .map(Secret::new)
    }
}

fn default_socket_dir() -> String {
    if Path::new("/var/run/postgresql").is_dir() {
        "/var/run/postgresql".into()
    } else {
        "/tmp".into()
    }
}

fn os_user_name() -> Option<String> {
    // SAFETY: getpwuid returns a pointer into static storage or NULL; we copy out at once.
    unsafe {
        let pw = libc::getpwuid(libc::geteuid());
        if pw.is_null() || (*pw).pw_name.is_null() {
            return std::env::var("USER").ok();
        }
        Some(
            std::ffi::CStr::from_ptr((*pw).pw_name)
                .to_string_lossy()
                .into_owned(),
        )
    }
}

/// `key=value` pairs separated by whitespace; values may be single-quoted, `\` escapes.
fn parse_kv(s: &str) -> Result<BTreeMap<String, String>, ConnInfoError> {
    let mut out = BTreeMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(ConnInfoError(format!(
                "missing \"=\" after \"{key}\" in connection info string"
            )));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut val = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    '\\' => val.push(chars.next().ok_or_else(|| {
                        ConnInfoError("unterminated quoted string in connection info string".into())
                    })?),
                    '\'' => {
                        closed = true;
                        break;
                    }
                    c => val.push(c),
                }
            }
            if !closed {
                return Err(ConnInfoError(
                    "unterminated quoted string in connection info string".into(),
                ));
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    if let Some(n) = chars.next() {
                        val.push(n);
                    }
                } else {
                    val.push(c);
                }
            }
        }
        if key.is_empty() {
            return Err(ConnInfoError("empty key in connection info string".into()));
        }
        out.insert(key, val);
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Result<String, ConnInfoError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| ConnInfoError(format!("invalid percent-encoded token: \"{s}\"")))?;
            if hex == 0 {
                return Err(ConnInfoError(format!(
                    "forbidden value %00 in percent-encoded value: \"{s}\""
                )));
            }
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ConnInfoError("percent-decoded value is not UTF-8".into()))
}

/// `postgresql://[user[:password]@][host[:port][,...]][/dbname][?param=value&...]`.
fn parse_uri(s: &str) -> Result<BTreeMap<String, String>, ConnInfoError> {
    let rest = s
        .strip_prefix("postgresql://")
        .or_else(|| s.strip_prefix("postgres://"))
        .expect("caller checked the scheme");
    let mut out = BTreeMap::new();
    let (main, query) = match rest.split_once('?') {
        Some((m, q)) => (m, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match main.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (main, None),
    };
    let hostspec = match authority.rsplit_once('@') {
        Some((userinfo, hostspec)) => {
            let (user, pass) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            if !user.is_empty() {
                out.insert("user".into(), percent_decode(user)?);
            }
            if let Some(p) = pass {
                out.insert("password".into(), percent_decode(p)?);
            }
            hostspec
        }
        None => authority,
    };
    if !hostspec.is_empty() {
        let mut hosts = Vec::new();
        let mut ports = Vec::new();
        for part in hostspec.split(',') {
            let (host, port) = if let Some(r) = part.strip_prefix('[') {
                let (h, after) = r.split_once(']').ok_or_else(|| {
                    ConnInfoError(format!(
                        "missing \"]\" in IPv6 host address in URI: \"{s}\""
                    ))
                })?;
                let port = match after.strip_prefix(':') {
                    Some(p) => p,
                    None if after.is_empty() => "",
                    None => {
                        return Err(ConnInfoError(format!(
                            "unexpected character after IPv6 host address in URI: \"{s}\""
                        )))
                    }
                };
                (h.to_string(), port)
            } else {
                match part.split_once(':') {
                    Some((h, p)) => (percent_decode(h)?, p),
                    None => (percent_decode(part)?, ""),
                }
            };
            hosts.push(host);
            ports.push(port.to_string());
        }
        out.insert("host".into(), hosts.join(","));
        if ports.iter().any(|p| !p.is_empty()) {
            out.insert("port".into(), ports.join(","));
        }
    }
    if let Some(db) = path.filter(|p| !p.is_empty()) {
        out.insert("dbname".into(), percent_decode(db)?);
    }
    if let Some(q) = query {
        for pair in q.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').ok_or_else(|| {
                ConnInfoError(format!(
                    "missing key/value separator \"=\" in URI query parameter: \"{pair}\""
                ))
            })?;
            let k = percent_decode(k)?;
            let mut v = percent_decode(v)?;
            let k = if k == "ssl" && v == "true" {
                v = "require".into();
                "sslmode".to_string()
            } else {
                k
            };
            out.insert(k, v);
        }
    }
    Ok(out)
}

/// Looks up a password in a `.pgpass`-format file; `None` if absent, unreadable, too permissive
/// (group/world access, as libpq refuses) or without a matching line.
pub fn pgpass_lookup(file: &Path, host: &str, port: u16, db: &str, user: &str) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(file).ok()?;
    if !meta.is_file() {
        return None;
    }
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            file = %file.display(),
            "password file has group or world access; permissions should be u=rw (0600) or less; ignoring it"
        );
        return None;
    }
    let content = std::fs::read_to_string(file).ok()?;
    let port = port.to_string();
    for line in content.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields = split_pgpass_line(line);
        if fields.len() < 5 {
            continue;
        }
        let m = |pat: &str, v: &str| pat == "*" || pat == v;
        if m(&fields[0], host) && m(&fields[1], &port) && m(&fields[2], db) && m(&fields[3], user) {
            return Some(fields[4..].join(":"));
        }
    }
    None
}

fn split_pgpass_line(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    fields.last_mut().unwrap().push(n);
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => fields.last_mut().unwrap().push(c),
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct MapEnv(HashMap<&'static str, &'static str>);
    impl Env for MapEnv {
        fn var(&self, key: &str) -> Option<String> {
            self.0.get(key).map(|s| s.to_string())
        }
    }
    fn env(pairs: &[(&'static str, &'static str)]) -> MapEnv {
        MapEnv(pairs.iter().cloned().collect())
    }
    fn parse(s: &str) -> ConnInfo {
        ConnInfo::parse(Some(s), &env(&[("PGUSER", "envuser")])).unwrap()
    }

    #[test]
    fn uri_full() {
        let c = parse("postgresql://alice:s%40cret@db.example.com:6543/app?sslmode=verify-full&application_name=x");
        assert_eq!(c.user, "alice");
        assert_eq!(c.password.as_ref().unwrap().expose(), "s@cret");
        assert_eq!(c.dbname, "app");
        assert_eq!(c.sslmode, SslMode::VerifyFull);
        assert_eq!(c.application_name.as_deref(), Some("x"));
        assert_eq!(
            c.targets,
            vec![Target::Tcp {
                host: "db.example.com".into(),
                port: 6543
            }]
        );
    }

    #[test]
    fn uri_multi_host_ipv6_and_socket() {
        let c = parse("postgres://[::1]:5433,h2/db");
        assert_eq!(
            c.targets,
            vec![
                Target::Tcp {
                    host: "::1".into(),
                    port: 5433
                },
                Target::Tcp {
                    host: "h2".into(),
                    port: 5432
                }
            ]
        );
        assert_eq!(c.targets[0].to_string(), "[::1]:5433");
        let c = parse("postgresql://%2Fvar%2Frun%2Fpg:5444");
        assert_eq!(
            c.targets[0].socket_path().unwrap(),
            PathBuf::from("/var/run/pg/.s.PGSQL.5444")
        );
        assert_eq!(c.user, "envuser");
        let c = parse("postgresql://h?ssl=true");
        assert_eq!(c.sslmode, SslMode::Require);
    }

    #[test]
    fn key_value_quoting() {
        let c =
            parse(r"host=localhost port = 5999 user='bob o\'neil' password=a\ b sslmode=disable");
        assert_eq!(c.user, "bob o'neil");
        assert_eq!(c.password.unwrap().expose(), "a b");
        assert_eq!(
            c.targets,
            vec![Target::Tcp {
                host: "localhost".into(),
                port: 5999
            }]
        );
        assert_eq!(c.sslmode, SslMode::Disable);
    }

    #[test]
    fn env_fills_gaps_but_string_wins() {
        let e = env(&[
            ("PGHOST", "/sock"),
            ("PGPORT", "7000"),
            ("PGUSER", "u"),
            ("PGPASSWORD", "pw"),
            ("PGSSLMODE", "require"),
            ("PGAPPNAME", "app"),
        ]);
        let c = ConnInfo::parse(Some("port=7001"), &e).unwrap();
        assert_eq!(
            c.targets,
            vec![Target::Unix {
                dir: "/sock".into(),
                port: 7001
            }]
        );
        assert_eq!(c.password.unwrap().expose(), "pw");
        assert_eq!(c.sslmode, SslMode::Require);
        assert_eq!(c.application_name.as_deref(), Some("app"));
        assert_eq!(c.dbname, "u");
    }

    #[test]
    fn malformed_inputs_are_refused() {
        let e = env(&[("PGUSER", "u")]);
        for bad in [
            "host",
            "host=a port=x",
            "host='unterminated",
            "bogus=1",
            "sslmode=sometimes",
            "postgresql://h:99999",
            "postgresql://h/db?x%zz=1",
            "postgresql://[::1/db",
            "host=a,b,c port=1,2",
            "connect_timeout=soon",
        ] {
            assert!(
                ConnInfo::parse(Some(bad), &e).is_err(),
                "{bad} should be refused"
            );
        }
    }

    #[test]
    fn password_never_printed() {
        let c = parse("postgresql://alice:hunter2@h/db");
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!c.display_target().contains("hunter2"));
    }

    #[test]
    fn pgpass_matching() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pgpass");
        std::fs::write(
            &f,
            "# comment\nother:*:*:*:no\nlocalhost:5432:replication:bob:p\\:w:x\n*:*:*:*:fallback\n",
        )
        .unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            pgpass_lookup(&f, "localhost", 5432, "replication", "bob").as_deref(),
            Some("p:w:x")
        );
        assert_eq!(
            pgpass_lookup(&f, "h", 1, "replication", "carol").as_deref(),
            Some("fallback")
        );
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(pgpass_lookup(&f, "h", 1, "replication", "carol"), None);
    }
}
