//! One server connection: transport (TCP, Unix socket, TLS), startup and authentication, message
//! framing, and the simple-query protocol.
//!
//! Reads are buffered in one `BytesMut`; [`Connection::try_next_message`] lets the replication
//! loop drain everything already received before it fsyncs and replies.
//!
//! A connection, TLS or not, can be taken off the runtime ([`Connection::detach`]) for a
//! thread of its own: its reads and writes then block that thread, with no readiness
//! registration, waker or scheduler between the socket and the caller — what a synchronous
//! standby's receive loop wants on every commit.

use std::collections::HashMap;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::{backend::Message, frontend};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tracing::{debug, info, warn};

use super::conninfo::{ConnInfo, SslMode, Target};
use super::error::{PgError, ServerError};
use super::tls;

/// A TLS session over a blocking socket ([`Connection::detach`]).
type BlockingTls = rustls::StreamOwned<rustls::ClientConnection, BatchedSocket>;

/// The socket under a connection.
enum Io {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// Off the runtime ([`Connection::detach`]): blocking, with a receive timeout of
    /// [`BLOCKING_WAIT`].
    BlockingTcp(std::net::TcpStream),
    BlockingUnix(std::os::unix::net::UnixStream),
    BlockingTls(Box<BlockingTls>),
    /// Lost while being detached (the conversion failed); every use fails.
    Gone,
}

/// How long a blocking read waits for data before it returns to its caller (who looks at
/// its timers and its stop request, then reads again).
pub const BLOCKING_WAIT: Duration = Duration::from_millis(100);

/// How long a send may make no progress before the connection is given up: the server
/// stopped reading without closing (half its own `wal_sender_timeout`, 60 s by default). The
/// error is an I/O error, transient: a stream reconnects, as after any lost connection,
/// instead of hanging in a send where no stop request reaches it.
pub const SEND_WAIT: Duration = Duration::from_secs(30);

/// Writes all of `buf` to a detached socket, whose send timeout is the connection's wait.
/// The flush is what sends a TLS session's records: rustls's `write` takes the plaintext and
/// ignores an error in sending it.
fn blocking_send(s: &mut impl std::io::Write, buf: &[u8], wait: Duration) -> std::io::Result<()> {
    s.write_all(buf)
        .and_then(|()| s.flush())
        .map_err(|e| match e.kind() {
            // What a blocking send that timed out returns (EAGAIN).
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => send_timed_out(wait),
            _ => e,
        })
}

/// Writes all of `buf` on the runtime, failing when one write makes no progress for `wait`.
async fn send<W: AsyncWrite + Unpin + ?Sized>(
    s: &mut W,
    mut buf: &[u8],
    wait: Duration,
) -> std::io::Result<()> {
    while !buf.is_empty() {
        match tokio::time::timeout(wait, s.write(buf)).await {
            Ok(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(Ok(n)) => buf = &buf[n..],
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(send_timed_out(wait)),
        }
    }
    Ok(())
}

fn send_timed_out(wait: Duration) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!(
            "the server took nothing sent to it for {:.1} s",
            wait.as_secs_f64()
        ),
    )
}

fn gone() -> PgError {
    PgError::Io(std::io::Error::new(
        std::io::ErrorKind::NotConnected,
        "the connection was lost while being taken off the runtime",
    ))
}

/// A backend message: `postgres-protocol`'s, plus the replication-only `CopyBothResponse`
/// (`'W'`), which its decoder does not know.
pub enum Backend {
    CopyBothResponse,
    Msg(Message),
}

/// One result set of a simple query: column names and rows of text values.
#[derive(Debug, Default, Clone)]
pub struct ResultSet {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Option<Bytes>>>,
}

impl ResultSet {
    /// Column `col` of row `row` as UTF-8 text.
    pub fn text(&self, row: usize, col: usize) -> Option<&str> {
        self.rows
            .get(row)?
            .get(col)?
            .as_ref()
            .and_then(|b| std::str::from_utf8(b).ok())
    }
}

/// `setsockopt(SO_RCVLOWAT)` on an open socket.
fn set_rcvlowat(fd: std::os::fd::RawFd, bytes: usize) -> std::io::Result<()> {
    let v = bytes.clamp(1, i32::MAX as usize) as libc::c_int;
    // SAFETY: a plain system call; the option value is a c_int on the stack, passed with
    // its size. A closed or foreign descriptor fails with EBADF/ENOTSOCK.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Connection {
    io: Io,
    rbuf: BytesMut,
    wbuf: BytesMut,
    params: HashMap<String, String>,
    target: Target,
    /// The socket under the transport (TLS included), for socket options.
    fd: std::os::fd::RawFd,
    /// How long a send may make no progress ([`SEND_WAIT`]; shorter in tests).
    send_wait: Duration,
}

pub(crate) fn parse_error_fields(
    fields: &mut postgres_protocol::message::backend::ErrorFields<'_>,
) -> ServerError {
    let mut e = ServerError {
        severity: "ERROR".into(),
        code: "XX000".into(),
        message: String::new(),
        detail: None,
        hint: None,
    };
    while let Ok(Some(f)) = fields.next() {
        let v = String::from_utf8_lossy(f.value_bytes()).into_owned();
        match f.type_() {
            b'V' => e.severity = v,
            b'S' if e.severity == "ERROR" => e.severity = v,
            b'C' => e.code = v,
            b'M' => e.message = v,
            b'D' => e.detail = Some(v),
            b'H' => e.hint = Some(v),
            _ => {}
        }
    }
    e
}

impl Connection {
    /// Connects to the first reachable target of `ci` and authenticates. `replication`:
    /// `Some("true")` for a physical walsender, `None` for a normal backend.
    pub async fn connect(
        ci: &ConnInfo,
        replication: Option<&str>,
        application_name: &str,
    ) -> Result<Self, PgError> {
        let mut last = None;
        for target in &ci.targets {
            let timeout = ci.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
            let attempt = tokio::time::timeout(
                timeout,
                Self::connect_one(ci, target, replication, application_name),
            )
            .await;
            match attempt {
                Ok(Ok(c)) => return Ok(c),
                Ok(Err(e)) => {
                    // Only network-level failures move on to the next host, as libpq does.
                    let next = matches!(e, PgError::Connect { .. });
                    if !next || ci.targets.len() == 1 {
                        return Err(e);
                    }
                    warn!(%target, error = %e, "trying the next host");
                    last = Some(e);
                }
                Err(_) => last = Some(PgError::ConnectTimeout(target.to_string())),
            }
        }
        Err(last.unwrap_or(PgError::Protocol("no host to connect to".into())))
    }

    async fn connect_one(
        ci: &ConnInfo,
        target: &Target,
        replication: Option<&str>,
        application_name: &str,
    ) -> Result<Self, PgError> {
        use std::os::fd::AsRawFd;
        let (io, fd) = match target {
            Target::Unix { .. } => {
                let path = target.socket_path().unwrap();
                let s = UnixStream::connect(&path)
                    .await
                    .map_err(|cause| PgError::Connect {
                        target: target.to_string(),
                        cause,
                    })?;
                // Like libpq: no TLS over Unix-domain sockets, whatever sslmode says.
                debug!(socket = %path.display(), "Unix socket: TLS not used");
                let fd = s.as_raw_fd();
                (Io::Unix(s), fd)
            }
            Target::Tcp { host, port } => {
                let s = TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(|cause| PgError::Connect {
                        target: target.to_string(),
                        cause,
                    })?;
                s.set_nodelay(true)?;
                let fd = s.as_raw_fd();
                (Self::maybe_tls(ci, host, s).await?, fd)
            }
        };
        let mut conn = Connection {
            io,
            rbuf: BytesMut::with_capacity(256 * 1024),
            wbuf: BytesMut::with_capacity(1024),
            params: HashMap::new(),
            target: target.clone(),
            fd,
            send_wait: SEND_WAIT,
        };
        conn.startup(ci, target, replication, application_name)
            .await?;
        Ok(conn)
    }

    async fn maybe_tls(ci: &ConnInfo, host: &str, mut s: TcpStream) -> Result<Io, PgError> {
        if matches!(ci.sslmode, SslMode::Disable | SslMode::Allow) {
            return Ok(Io::Tcp(s));
        }
        let config = tls::client_config(ci)?;
        let mut buf = BytesMut::new();
        frontend::ssl_request(&mut buf);
        s.write_all(&buf).await?;
        let mut answer = [0u8; 1];
        s.read_exact(&mut answer).await?;
        match answer[0] {
            b'S' => {
                let connector = tokio_rustls::TlsConnector::from(config);
                let tls = connector
                    .connect(tls::server_name(host)?, s)
                    .await
                    .map_err(|e| PgError::Tls(format!("handshake with {host} failed: {e}")))?;
                debug!(host, "TLS established");
                Ok(Io::Tls(Box::new(tls)))
            }
            b'N' if ci.sslmode == SslMode::Prefer => Ok(Io::Tcp(s)),
            b'N' => Err(PgError::Tls(format!(
                "server {host} does not support SSL, but sslmode={:?} requires it",
                ci.sslmode
            ))),
            other => Err(PgError::Protocol(format!(
                "unexpected answer {other:#04x} to SSLRequest"
            ))),
        }
    }

    async fn startup(
        &mut self,
        ci: &ConnInfo,
        target: &Target,
        replication: Option<&str>,
        application_name: &str,
    ) -> Result<(), PgError> {
        let mut params: Vec<(&str, &str)> =
            vec![("user", &ci.user), ("application_name", application_name)];
        match replication {
            Some(r) => params.push(("replication", r)),
            None => params.push(("database", &ci.dbname)),
        }
        frontend::startup_message(params.iter().copied(), &mut self.wbuf)?;
        self.flush().await?;

        let mut scram: Option<ScramSha256> = None;
        loop {
            match self.next_plain().await? {
                Message::AuthenticationOk => {}
                Message::AuthenticationCleartextPassword => {
                    let pw = self.need_password(ci, target)?;
                    frontend::password_message(pw.expose().as_bytes(), &mut self.wbuf)?;
                    self.flush().await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let pw = self.need_password(ci, target)?;
                    let hash = postgres_protocol::authentication::md5_hash(
                        ci.user.as_bytes(),
                        pw.expose().as_bytes(),
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.wbuf)?;
                    self.flush().await?;
                }
                Message::AuthenticationSasl(body) => {
                    let mut mechs = body.mechanisms();
                    let mut ok = false;
                    while let Some(m) = mechs.next().map_err(|e| PgError::Protocol(e.to_string()))? {
                        ok |= m == SCRAM_SHA_256;
                    }
                    if !ok {
                        return Err(PgError::Auth("server offered no supported SASL mechanism (need SCRAM-SHA-256)".into()));
                    }
                    let pw = self.need_password(ci, target)?;
                    let s = ScramSha256::new(pw.expose().as_bytes(), ChannelBinding::unsupported());
                    frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut self.wbuf)?;
                    self.flush().await?;
                    scram = Some(s);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| PgError::Protocol("SASL continue without SASL start".into()))?;
                    s.update(body.data())
                        .map_err(|e| PgError::Auth(format!("SCRAM exchange failed: {e}")))?;
                    frontend::sasl_response(s.message(), &mut self.wbuf)?;
                    self.flush().await?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| PgError::Protocol("SASL final without SASL start".into()))?;
                    s.finish(body.data())
                        .map_err(|e| PgError::Auth(format!("server's SCRAM signature is invalid: {e}")))?;
                }
                Message::AuthenticationKerberosV5
                | Message::AuthenticationGss
                | Message::AuthenticationSspi
                | Message::AuthenticationScmCredential
                | Message::AuthenticationGssContinue(_) => {
                    return Err(PgError::Auth(
                        "the server asks for an authentication method archiver does not support (GSSAPI/SSPI/Kerberos); use scram-sha-256, md5, password, trust or cert".into(),
                    ))
                }
                Message::BackendKeyData(_) => {}
                Message::ParameterStatus(p) => {
                    if let (Ok(n), Ok(v)) = (p.name(), p.value()) {
                        self.params.insert(n.to_string(), v.to_string());
                    }
                }
                Message::ReadyForQuery(_) => return Ok(()),
                Message::ErrorResponse(body) => {
                    let e = parse_error_fields(&mut body.fields());
                    return Err(match e.code.as_str() {
                        "28P01" | "28000" => PgError::Auth(e.to_string()),
                        _ => PgError::Server(e),
                    });
                }
                Message::NoticeResponse(body) => self.log_notice(&mut body.fields()),
                _ => return Err(PgError::Protocol("unexpected message during startup".into())),
            }
        }
    }

    fn need_password(
        &self,
        ci: &ConnInfo,
        target: &Target,
    ) -> Result<super::conninfo::Secret, PgError> {
        ci.password_for(target).ok_or_else(|| {
            PgError::Auth(format!(
                "the server at {target} requested a password for user \"{}\", but none was given (use the conninfo, PGPASSWORD or ~/.pgpass)",
                ci.user
            ))
        })
    }

    fn log_notice(&self, fields: &mut postgres_protocol::message::backend::ErrorFields<'_>) {
        let n = parse_error_fields(fields);
        info!(severity = %n.severity, code = %n.code, "server notice: {}", n.message);
    }

    /// A server parameter reported at startup (`server_version`, ...).
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Sets the socket's receive low-water mark (`SO_RCVLOWAT`). On the runtime, over TCP,
    /// the kernel reports the socket readable, and wakes the runtime, only once this many
    /// bytes are queued (or at once, when they already are); Unix-domain sockets ignore it
    /// there. On a [detached](Self::detach) connection, plain or TLS, a blocking read
    /// returns once this many bytes have come, or after [`BLOCKING_WAIT`] with what came
    /// meanwhile. `1` is the default.
    pub fn set_recv_low_water(&self, bytes: usize) -> Result<(), PgError> {
        // `fd` is the open socket `io` owns for as long as `self` lives.
        Ok(set_rcvlowat(self.fd, bytes)?)
    }

    /// Bytes read from the socket and not yet taken as messages: the start of a message whose
    /// rest is still to come (or, over TLS, part of it: rustls and [`BatchedSocket`] may hold
    /// more).
    pub fn buffered(&self) -> usize {
        self.rbuf.len()
    }

    /// Queues raw frontend bytes (built with `postgres_protocol::message::frontend`).
    pub fn write_buf(&mut self) -> &mut BytesMut {
        &mut self.wbuf
    }

    /// Sends everything queued (blocking the thread when [detached](Self::detach)). A send that
    /// makes no progress for [`SEND_WAIT`] fails, and the connection is unusable from then on.
    pub async fn flush(&mut self) -> Result<(), PgError> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let wait = self.send_wait;
        let sent = match &mut self.io {
            Io::Tcp(s) => send(s, &self.wbuf, wait).await,
            Io::Unix(s) => send(s, &self.wbuf, wait).await,
            Io::Tls(s) => match send(s, &self.wbuf, wait).await {
                Ok(()) => tokio::time::timeout(wait, s.flush())
                    .await
                    .unwrap_or_else(|_| Err(send_timed_out(wait))),
                e => e,
            },
            Io::BlockingTcp(s) => blocking_send(s, &self.wbuf, wait),
            Io::BlockingUnix(s) => blocking_send(s, &self.wbuf, wait),
            Io::BlockingTls(s) => blocking_send(s.as_mut(), &self.wbuf, wait),
            Io::Gone => return Err(gone()),
        };
        if let Err(e) = sent {
            // Part of a message may have gone out: nothing more can be said on it.
            self.io = Io::Gone;
            return Err(e.into());
        }
        self.wbuf.clear();
        Ok(())
    }

    /// Takes the connection off the runtime: from now on its reads and writes block the
    /// calling thread (a read for at most [`BLOCKING_WAIT`] in
    /// [`next_message_blocking`](Self::next_message_blocking)), and the runtime's I/O
    /// driver no longer hears of its traffic. Only for a thread of its own, never a runtime
    /// worker. A TLS session moves over whole (rustls keeps whatever it has buffered, sent or
    /// received), onto a socket read in large pieces ([`BatchedSocket`]). Returns false only
    /// for a connection already lost.
    pub fn detach(&mut self) -> Result<bool, PgError> {
        let send_wait = self.send_wait;
        let io = match std::mem::replace(&mut self.io, Io::Gone) {
            Io::Tcp(s) => {
                let s = s.into_std()?;
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(BLOCKING_WAIT))?;
                s.set_write_timeout(Some(send_wait))?;
                Io::BlockingTcp(s)
            }
            Io::Unix(s) => {
                let s = s.into_std()?;
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(BLOCKING_WAIT))?;
                s.set_write_timeout(Some(send_wait))?;
                Io::BlockingUnix(s)
            }
            Io::Tls(s) => {
                let (tcp, session) = (*s).into_inner();
                let tcp = tcp.into_std()?;
                tcp.set_nonblocking(false)?;
                tcp.set_read_timeout(Some(BLOCKING_WAIT))?;
                tcp.set_write_timeout(Some(send_wait))?;
                Io::BlockingTls(Box::new(rustls::StreamOwned::new(
                    session,
                    BatchedSocket::new(tcp),
                )))
            }
            other => {
                let detached = matches!(
                    other,
                    Io::BlockingTcp(_) | Io::BlockingUnix(_) | Io::BlockingTls(_)
                );
                self.io = other;
                return Ok(detached);
            }
        };
        self.io = io;
        Ok(true)
    }

    /// Reads once into the buffer; for a detached connection `Ok(None)` when nothing came
    /// within [`BLOCKING_WAIT`].
    async fn read_more(&mut self) -> Result<Option<usize>, PgError> {
        make_room(&mut self.rbuf);
        let n = match &mut self.io {
            Io::Tcp(s) => s.read_buf(&mut self.rbuf).await?,
            Io::Unix(s) => s.read_buf(&mut self.rbuf).await?,
            Io::Tls(s) => s.read_buf(&mut self.rbuf).await?,
            Io::BlockingTcp(_) | Io::BlockingUnix(_) | Io::BlockingTls(_) => {
                return self.read_blocking()
            }
            Io::Gone => return Err(gone()),
        };
        if n == 0 {
            return Err(PgError::Closed);
        }
        Ok(Some(n))
    }

    /// One `recv` on a detached socket, straight into the buffer's spare capacity (over TLS:
    /// the plaintext of the session's next record, the socket read as that needs).
    fn read_blocking(&mut self) -> Result<Option<usize>, PgError> {
        use bytes::BufMut;
        if let Io::BlockingTls(s) = &mut self.io {
            return read_tls_blocking(s, &mut self.rbuf);
        }
        if !matches!(self.io, Io::BlockingTcp(_) | Io::BlockingUnix(_)) {
            return Err(gone());
        }
        // Never an empty spare slice: a `recv` of 0 bytes would read as the server closing.
        make_room(&mut self.rbuf);
        let spare = self.rbuf.chunk_mut();
        // SAFETY: `fd` is the open socket `io` owns; the kernel writes at most `spare.len()`
        // bytes into the buffer's spare capacity, and only the `n` it reports are then
        // marked initialised.
        let n = unsafe { libc::recv(self.fd, spare.as_mut_ptr().cast(), spare.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Ok(None),
                std::io::ErrorKind::Interrupted => Ok(Some(0)),
                _ => Err(e.into()),
            };
        }
        if n == 0 {
            return Err(PgError::Closed);
        }
        // SAFETY: the kernel initialised `n` bytes of the spare capacity.
        unsafe { self.rbuf.advance_mut(n as usize) };
        Ok(Some(n as usize))
    }

    /// The next message of a [detached](Self::detach) connection, or `None` when nothing
    /// complete arrived within [`BLOCKING_WAIT`]. Blocks the calling thread.
    pub fn next_message_blocking(&mut self) -> Result<Option<Backend>, PgError> {
        loop {
            if let Some(m) = self.try_next_message()? {
                return Ok(Some(m));
            }
            if self.read_blocking()?.is_none() {
                return Ok(None);
            }
        }
    }

    /// Decodes one message from the buffer, if a complete one is there.
    pub fn try_next_message(&mut self) -> Result<Option<Backend>, PgError> {
        if self.rbuf.len() >= 5 && self.rbuf[0] == b'W' {
            let len = (&self.rbuf[1..5]).get_u32() as usize;
            if self.rbuf.len() < len + 1 {
                return Ok(None);
            }
            self.rbuf.advance(len + 1);
            return Ok(Some(Backend::CopyBothResponse));
        }
        match Message::parse(&mut self.rbuf) {
            Ok(Some(m)) => Ok(Some(Backend::Msg(m))),
            Ok(None) => Ok(None),
            Err(e) => Err(PgError::Protocol(e.to_string())),
        }
    }

    /// Waits for the next message.
    pub async fn next_message(&mut self) -> Result<Backend, PgError> {
        loop {
            if let Some(m) = self.try_next_message()? {
                return Ok(m);
            }
            self.read_more().await?;
        }
    }

    /// The next message that is not a notice or parameter status; `CopyBothResponse` is a protocol error here.
    async fn next_plain(&mut self) -> Result<Message, PgError> {
        loop {
            match self.next_message().await? {
                Backend::Msg(Message::NoticeResponse(body)) => self.log_notice(&mut body.fields()),
                Backend::Msg(Message::ParameterStatus(p)) => {
                    if let (Ok(n), Ok(v)) = (p.name(), p.value()) {
                        self.params.insert(n.to_string(), v.to_string());
                    }
                }
                Backend::Msg(m) => return Ok(m),
                Backend::CopyBothResponse => {
                    return Err(PgError::Protocol("unexpected CopyBothResponse".into()))
                }
            }
        }
    }

    /// Runs a simple query to completion and returns its result sets. An `ErrorResponse` is
    /// returned as [`PgError::Server`] after the server is ready again.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<ResultSet>, PgError> {
        frontend::query(sql, &mut self.wbuf)?;
        self.flush().await?;
        self.read_results().await
    }

    /// Reads result sets up to `ReadyForQuery`.
    pub async fn read_results(&mut self) -> Result<Vec<ResultSet>, PgError> {
        self.read_results_from(None).await
    }

    /// Like [`Self::read_results`], with the first message already read by the caller.
    pub async fn read_results_from(
        &mut self,
        mut first: Option<Message>,
    ) -> Result<Vec<ResultSet>, PgError> {
        let mut out = Vec::new();
        let mut cur: Option<ResultSet> = None;
        let mut err = None;
        loop {
            let msg = match first.take() {
                Some(m) => m,
                None => self.next_plain().await?,
            };
            match msg {
                Message::RowDescription(rd) => {
                    let mut cols = Vec::new();
                    let mut f = rd.fields();
                    while let Some(field) =
                        f.next().map_err(|e| PgError::Protocol(e.to_string()))?
                    {
                        cols.push(field.name().to_string());
                    }
                    cur = Some(ResultSet {
                        columns: cols,
                        rows: Vec::new(),
                    });
                }
                Message::DataRow(row) => {
                    let rs = cur.as_mut().ok_or_else(|| {
                        PgError::Protocol("DataRow without RowDescription".into())
                    })?;
                    rs.rows.push(decode_row(&row)?);
                }
                Message::CommandComplete(_) | Message::EmptyQueryResponse => {
                    if let Some(rs) = cur.take() {
                        out.push(rs);
                    }
                }
                Message::ErrorResponse(body) => err = Some(parse_error_fields(&mut body.fields())),
                Message::ReadyForQuery(_) => {
                    return match err {
                        Some(e) => Err(PgError::Server(e)),
                        None => Ok(out),
                    }
                }
                Message::CopyOutResponse(_) | Message::CopyInResponse(_) => {
                    return Err(PgError::Protocol(
                        "unexpected COPY response to a simple query".into(),
                    ))
                }
                _ => {
                    return Err(PgError::Protocol(
                        "unexpected message in query result".into(),
                    ))
                }
            }
        }
    }

    /// Runs a command the server answers with `CopyInResponse` (`UPLOAD_MANIFEST`), sends
    /// `data` as CopyData messages and CopyDone, and reads the result up to `ReadyForQuery`.
    /// An error before the COPY starts (e.g. the command is unknown to the server) is returned
    /// as the server said it.
    pub async fn copy_in(&mut self, sql: &str, data: &[u8]) -> Result<(), PgError> {
        frontend::query(sql, &mut self.wbuf)?;
        self.flush().await?;
        match self.next_plain().await? {
            Message::CopyInResponse(_) => {}
            other => {
                self.read_results_from(Some(other)).await?;
                return Err(PgError::Protocol(format!(
                    "{sql}: the server did not start a COPY"
                )));
            }
        }
        for chunk in data.chunks(256 * 1024) {
            frontend::CopyData::new(chunk)?.write(&mut self.wbuf);
            self.flush().await?;
        }
        frontend::copy_done(&mut self.wbuf);
        self.flush().await?;
        self.read_results().await.map(|_| ())
    }

    /// Says goodbye politely.
    pub async fn close(&mut self) {
        frontend::terminate(&mut self.wbuf);
        let _ = self.flush().await;
        let _ = match &mut self.io {
            Io::Tcp(s) => s.shutdown().await,
            Io::Unix(s) => s.shutdown().await,
            Io::Tls(s) => s.shutdown().await,
            Io::BlockingTcp(s) => s.shutdown(std::net::Shutdown::Both),
            Io::BlockingUnix(s) => s.shutdown(std::net::Shutdown::Both),
            Io::BlockingTls(s) => {
                s.conn.send_close_notify();
                let _ = std::io::Write::flush(s.as_mut());
                s.sock.tcp.shutdown(std::net::Shutdown::Both)
            }
            Io::Gone => Ok(()),
        };
    }
}

/// At least 64 KiB free at the end of a read buffer (growing it by 256 KiB at a time).
fn make_room(rbuf: &mut BytesMut) {
    if rbuf.capacity() - rbuf.len() < 64 * 1024 {
        rbuf.reserve(256 * 1024);
    }
}

/// Reads what a detached TLS session yields into `rbuf`: `Ok(None)` when nothing came within
/// [`BLOCKING_WAIT`].
fn read_tls_blocking(s: &mut BlockingTls, rbuf: &mut BytesMut) -> Result<Option<usize>, PgError> {
    use std::io::Read;
    make_room(rbuf);
    // rustls reads into initialised memory: zero what this read may take, not all the spare
    // capacity (a TLS record holds at most 16 KiB; more is read on the next call).
    let start = rbuf.len();
    rbuf.resize(start + 64 * 1024, 0);
    let r = s.read(&mut rbuf[start..]);
    rbuf.truncate(start + *r.as_ref().unwrap_or(&0));
    match r {
        Ok(0) => Err(PgError::Closed),
        Ok(n) => Ok(Some(n)),
        Err(e) => match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => Ok(None),
            std::io::ErrorKind::Interrupted => Ok(Some(0)),
            _ => Err(e.into()),
        },
    }
}

/// The socket under a detached TLS session: rustls reads 4 KiB at a time (`READ_SIZE` in its
/// deframer), and a `recv` of 4 KiB returns as soon as 4 KiB are queued, whatever
/// `SO_RCVLOWAT` says (the kernel waits for the smaller of the two). Reading the socket
/// 256 KiB at a time here lets the low-water mark batch a TLS stream's wake-ups as it does a
/// plain one's, and takes one `recv` where rustls would make sixty-four.
struct BatchedSocket {
    tcp: std::net::TcpStream,
    buf: Box<[u8]>,
    pos: usize,
    len: usize,
}

impl BatchedSocket {
    fn new(tcp: std::net::TcpStream) -> Self {
        BatchedSocket {
            tcp,
            buf: vec![0u8; 256 * 1024].into_boxed_slice(),
            pos: 0,
            len: 0,
        }
    }
}

impl std::io::Read for BatchedSocket {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos == self.len {
            self.len = self.tcp.read(&mut self.buf)?;
            self.pos = 0;
        }
        let n = out.len().min(self.len - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl std::io::Write for BatchedSocket {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.tcp.write(b)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.tcp.flush()
    }
}

pub(crate) fn decode_row(
    row: &postgres_protocol::message::backend::DataRowBody,
) -> Result<Vec<Option<Bytes>>, PgError> {
    let buf = row.buffer_bytes();
    let mut vals = Vec::new();
    let mut ranges = row.ranges();
    while let Some(r) = ranges
        .next()
        .map_err(|e| PgError::Protocol(e.to_string()))?
    {
        vals.push(r.map(|r| buf.slice(r)));
    }
    Ok(vals)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;

    fn readable_within(fd: std::os::fd::RawFd, ms: i32) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd on the stack.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        assert!(n >= 0, "{}", std::io::Error::last_os_error());
        n == 1 && p.revents & libc::POLLIN != 0
    }

    /// Below the low-water mark a queued byte does not make the socket readable (so it wakes
    /// no one); resetting the mark to 1 makes it readable at once — what the asynchronous
    /// stream's pause relies on.
    #[test]
    fn the_receive_low_water_mark_holds_readiness_back_until_reset() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut tx = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut rx, _) = l.accept().unwrap();
        let fd = rx.as_raw_fd();
        set_rcvlowat(fd, 1024).unwrap();
        tx.write_all(&[7; 100]).unwrap();
        assert!(
            !readable_within(fd, 200),
            "readable below the low-water mark"
        );
        set_rcvlowat(fd, 1).unwrap();
        assert!(readable_within(fd, 1000));
        let mut buf = [0u8; 2048];
        assert_eq!(rx.read(&mut buf).unwrap(), 100);
        // Past the mark it is readable again without a reset.
        set_rcvlowat(fd, 1024).unwrap();
        tx.write_all(&[8; 1500]).unwrap();
        assert!(readable_within(fd, 1000));
        assert!(set_rcvlowat(-1, 1).is_err());
    }

    fn plain(io: Io, fd: std::os::fd::RawFd) -> Connection {
        Connection {
            io,
            rbuf: BytesMut::with_capacity(1024),
            wbuf: BytesMut::new(),
            params: HashMap::new(),
            target: Target::Tcp {
                host: "127.0.0.1".into(),
                port: 0,
            },
            fd,
            send_wait: SEND_WAIT,
        }
    }

    /// A backend CopyData message carrying `payload`.
    fn copy_data(payload: &[u8]) -> Vec<u8> {
        let mut m = vec![b'd'];
        m.extend_from_slice(&(4 + payload.len() as u32).to_be_bytes());
        m.extend_from_slice(payload);
        m
    }

    /// Taken off the runtime, a connection's reads block the calling thread: a whole message
    /// however it was split, `None` after [`BLOCKING_WAIT`] of silence, `Closed` at the end;
    /// its writes go out as before.
    fn check_detached(mut c: Connection, mut peer: impl Read + Write + Send + 'static) {
        assert!(c.detach().unwrap(), "a plain socket detaches");
        assert!(c.detach().unwrap(), "and detaching again changes nothing");
        let rt = tokio::runtime::Handle::current();
        std::thread::spawn(move || {
            let t = std::time::Instant::now();
            assert!(c.next_message_blocking().unwrap().is_none());
            assert!(t.elapsed() >= BLOCKING_WAIT * 9 / 10, "{:?}", t.elapsed());

            let msg = copy_data(&[5; 3000]);
            let (head, tail) = msg.split_at(7);
            let (head, tail) = (head.to_vec(), tail.to_vec());
            let peer = std::thread::spawn(move || {
                peer.write_all(&head).unwrap();
                std::thread::sleep(Duration::from_millis(30));
                peer.write_all(&tail).unwrap();
                peer
            });
            let m = loop {
                if let Some(m) = c.next_message_blocking().unwrap() {
                    break m;
                }
            };
            let Backend::Msg(Message::CopyData(body)) = m else {
                panic!("not CopyData");
            };
            assert_eq!(body.data(), &[5; 3000][..]);
            let mut peer = peer.join().unwrap();

            c.write_buf().extend_from_slice(b"hello");
            rt.block_on(c.flush()).unwrap();
            let mut got = [0u8; 5];
            peer.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"hello");

            drop(peer);
            let end = loop {
                match c.next_message_blocking() {
                    Ok(None) => continue,
                    other => break other,
                }
            };
            assert!(matches!(end, Err(PgError::Closed)), "{:?}", end.err());
        })
        .join()
        .unwrap();
    }

    /// What a send to a server that stops reading without closing must do: give up after
    /// the wait instead of blocking forever, with a transient error, the connection unusable
    /// after.
    fn check_send_times_out(c: &mut Connection, rt: &tokio::runtime::Handle) {
        let t = std::time::Instant::now();
        // Far more than both socket buffers hold.
        c.write_buf().extend_from_slice(&vec![1u8; 64 << 20]);
        let e = rt.block_on(c.flush()).unwrap_err();
        assert!(t.elapsed() >= c.send_wait, "{:?}", t.elapsed());
        assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
        let PgError::Io(io) = &e else {
            panic!("not an I/O error: {e}");
        };
        assert_eq!(io.kind(), std::io::ErrorKind::TimedOut, "{e}");
        assert!(e.is_transient());
        c.write_buf().extend_from_slice(b"x");
        assert!(
            rt.block_on(c.flush()).is_err(),
            "usable after a timed-out send"
        );
    }

    /// With a low-water mark, a detached connection gets a message sent in pieces in a few
    /// reads once enough has come, and a small one all the same after [`BLOCKING_WAIT`].
    fn check_batched(mut c: Connection, mut peer: impl Read + Write + Send + 'static) {
        assert!(c.detach().unwrap());
        c.set_recv_low_water(64 * 1024).unwrap();
        std::thread::spawn(move || {
            // A small message alone: held back only until the wait is over.
            peer.write_all(&copy_data(b"tiny")).unwrap();
            let t = std::time::Instant::now();
            let m = loop {
                if let Some(m) = c.next_message_blocking().unwrap() {
                    break m;
                }
            };
            assert!(t.elapsed() < BLOCKING_WAIT * 3, "{:?}", t.elapsed());
            let Backend::Msg(Message::CopyData(body)) = m else {
                panic!("not CopyData");
            };
            assert_eq!(body.data(), b"tiny");
            // 100 KiB in 20 pieces, 5 ms apart: one read once 64 KiB are there, not one per
            // piece.
            let msg = copy_data(&[7; 100 * 1024]);
            let writer = std::thread::spawn(move || {
                for piece in msg.chunks(msg.len() / 20 + 1) {
                    peer.write_all(piece).unwrap();
                    std::thread::sleep(Duration::from_millis(5));
                }
                peer
            });
            let mut reads = 0;
            let m = loop {
                if let Some(m) = c.try_next_message().unwrap() {
                    break m;
                }
                if c.read_blocking().unwrap().is_some_and(|n| n > 0) {
                    reads += 1;
                }
            };
            assert!(reads <= 6, "{reads} reads for 20 pieces");
            let Backend::Msg(Message::CopyData(body)) = m else {
                panic!("not CopyData");
            };
            assert_eq!(body.data().len(), 100 * 1024);
            drop(writer.join().unwrap());
        })
        .join()
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_detached_connection_reads_in_batches() {
        let (c, peer) = tcp_pair();
        check_batched(c, peer);
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let a = UnixStream::from_std(a).unwrap();
        let fd = a.as_raw_fd();
        check_batched(plain(Io::Unix(a), fd), b);
    }

    /// A connection on the runtime over TCP and its peer; its sends give up after 300 ms.
    fn tcp_pair() -> (Connection, std::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        s.set_nonblocking(true).unwrap();
        let s = TcpStream::from_std(s).unwrap();
        let (peer, _) = l.accept().unwrap();
        let fd = s.as_raw_fd();
        let mut c = plain(Io::Tcp(s), fd);
        c.send_wait = Duration::from_millis(300);
        (c, peer)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_detached_send_the_server_never_reads_times_out() {
        let (mut c, _peer) = tcp_pair();
        assert!(c.detach().unwrap());
        let rt = tokio::runtime::Handle::current();
        std::thread::spawn(move || {
            check_send_times_out(&mut c, &rt);
            assert!(c.next_message_blocking().is_err());
        })
        .join()
        .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_send_on_the_runtime_the_server_never_reads_times_out() {
        let (mut c, _peer) = tcp_pair();
        let rt = tokio::runtime::Handle::current();
        std::thread::spawn(move || check_send_times_out(&mut c, &rt))
            .join()
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_detached_tcp_connection_blocks_its_own_thread() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (peer, _) = l.accept().unwrap();
        let fd = s.as_raw_fd();
        check_detached(plain(Io::Tcp(s), fd), peer);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_detached_unix_connection_blocks_its_own_thread() {
        let (s, peer) = std::os::unix::net::UnixStream::pair().unwrap();
        s.set_nonblocking(true).unwrap();
        let s = UnixStream::from_std(s).unwrap();
        let fd = s.as_raw_fd();
        check_detached(plain(Io::Unix(s), fd), peer);
    }

    #[test]
    fn a_connection_lost_while_detaching_fails_every_use() {
        let mut c = plain(Io::Gone, -1);
        assert!(!c.detach().unwrap());
        let e = c.next_message_blocking().err().expect("an error");
        assert!(e.to_string().contains("taken off the runtime"), "{e}");
        c.write_buf().extend_from_slice(b"x");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert!(rt.block_on(c.flush()).is_err());
    }
}
