//! A client of PostgreSQL's streaming logical replication: `START_REPLICATION` on a
//! `replication=database` walsender connection. tokio-postgres 0.7 cannot do CopyBoth, so
//! this speaks the wire protocol itself: postgres-protocol encodes the frontend messages and
//! does MD5/SCRAM, backend messages are framed here (its parser has no CopyBothResponse).
//! TLS as `sslmode` says, with the same rules as every other session (`crate::tls`).

use std::io;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
#[cfg(unix)]
use tokio::net::UnixStream;
use tokio_postgres::config::{self, Config, Host};
use tokio_postgres::error::SqlState;

use crate::ids::Lsn;
use crate::retry::{classify_sqlstate, Class, Classify};
use crate::spec::Dsn;
use crate::sql::{quote_ident, quote_literal};

/// Room made in the read buffer before each read; XLogData of big rows are larger and
/// reserve their whole length once their header is in.
const READ_CHUNK: usize = 64 * 1024;
/// Seconds from the Unix epoch to PostgreSQL's (2000-01-01), for standby status clocks.
const PG_EPOCH_UNIX_SECS: u64 = 946_684_800;
/// SQLSTATE object_in_use: "replication slot ... is active for PID ...".
const OBJECT_IN_USE: &str = "55006";

/// One message of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalMessage {
    /// pgoutput bytes of one message (same bytes as `pg_logical_slot_peek_binary_changes`
    /// returns in `data`).
    XLogData { wal_start: Lsn, data: Bytes },
    /// Server keepalive: everything before `wal_end` has been decoded and sent.
    Keepalive { wal_end: Lsn, reply_requested: bool },
}

#[derive(Debug, thiserror::Error)]
pub enum WalStreamError {
    /// No connection, or the server refused it during startup. `code` is the SQLSTATE of a
    /// refusal (28P01 too when the server wants a password the DSN lacks); `None` when the
    /// server could not be reached at all.
    #[error("cannot open a replication connection to {at}: {reason}")]
    Connect {
        at: String,
        reason: String,
        code: Option<String>,
    },
    /// The slot is streamed by another connection (SQLSTATE 55006).
    #[error("replication slot busy: {0}")]
    SlotBusy(String),
    #[error("replication error {code}: {message}")]
    Server { code: String, message: String },
    #[error("the server ended the replication stream")]
    Closed,
    #[error("replication protocol error: {0}")]
    Protocol(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("replication connection i/o: {0}")]
    Io(#[from] io::Error),
}

impl WalStreamError {}

impl Classify for WalStreamError {
    /// Whether reconnecting can succeed, by the one SQLSTATE policy: lost connections,
    /// unreachable servers, and server errors of classes 08, 53 and 57. A busy slot, bad
    /// credentials, protocol and configuration errors are permanent.
    fn class(&self) -> Class {
        let of_code = |code: &str| classify_sqlstate(&SqlState::from_code(code));
        match self {
            WalStreamError::Io(_) | WalStreamError::Closed => Class::Transient,
            WalStreamError::Connect { code, .. } => {
                code.as_deref().map_or(Class::Transient, of_code)
            }
            WalStreamError::Server { code, .. } => of_code(code),
            WalStreamError::SlotBusy(_)
            | WalStreamError::Protocol(_)
            | WalStreamError::Unsupported(_) => Class::Permanent,
        }
    }
}

trait Socket: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Socket for T {}

/// A running replication stream. Dropping it closes the connection, which releases the slot.
pub struct WalStream {
    socket: Box<dyn Socket>,
    /// Received bytes not yet returned as messages; what makes `next` cancel-safe.
    read: BytesMut,
    /// Encoded messages not yet written; a cancelled `confirm` leaves no half message behind.
    write: BytesMut,
    at: String,
}

impl std::fmt::Debug for WalStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WalStream({})", self.at)
    }
}

/// `logical_decoding_work_mem` of our replication sessions: the most decoded data the
/// server keeps of one transaction before streaming it.
const DECODING_WORK_MEM: &str = "16MB";

impl WalStream {
    /// Connects with the DSN's hosts (in order), port, user, password and database as a
    /// `replication=database` session, runs `START_REPLICATION SLOT .. LOGICAL from` with
    /// pgoutput protocol 1 and `publication`, and waits for the server to start streaming.
    pub async fn start(
        dsn: &Dsn,
        application_name: &str,
        slot: &str,
        publication: &str,
        from: Lsn,
    ) -> Result<WalStream, WalStreamError> {
        let at = dsn.redacted();
        let refused = |reason: String, code: Option<String>| WalStreamError::Connect {
            at: at.clone(),
            reason,
            code,
        };
        // Connection strings we cannot use are permanent errors: retrying will not help.
        let unusable = |why: String| WalStreamError::Unsupported(format!("{at}: {why}"));
        let info = dsn.conninfo().map_err(unusable)?;
        let config: Config = info.config.clone();
        if config.get_channel_binding() == config::ChannelBinding::Require {
            return Err(unusable(
                "channel_binding=require is not supported by the replication stream".into(),
            ));
        }
        let tls = crate::tls::client_config(&info.tls).map_err(unusable)?;
        let user = config
            .get_user()
            .ok_or_else(|| unusable("the connection string names no user".into()))?;
        let database = config.get_dbname().unwrap_or(user);

        if config.get_hosts().is_empty() && config.get_hostaddrs().is_empty() {
            return Err(unusable("the connection string names no host".into()));
        }
        let (socket, tcp_host) = connect_socket(&config)
            .await
            .map_err(|r| refused(r, None))?;
        // TLS as for every session: asked for first, then the handshake (none on a Unix
        // socket, as libpq).
        let socket = match (tls, tcp_host) {
            (Some(tls), Some(host)) => negotiate_tls(socket, tls, &host, info.tls.mode)
                .await
                .map_err(|e| unusable(format!("TLS: {e}")))?,
            _ => socket,
        };
        let mut stream = WalStream {
            socket,
            read: BytesMut::with_capacity(READ_CHUNK),
            write: BytesMut::new(),
            at: at.clone(),
        };
        let mut params = vec![
            ("user", user),
            ("database", database),
            ("replication", "database"),
            ("application_name", application_name),
        ];
        // Large transactions: past this much decoded data the server streams them in
        // progress (protocol 2) instead of holding them for us to hold again whole.
        // Tests set a smaller one, so small transactions take the streamed path too.
        let work_mem = std::env::var("SCHEMASHIFT_DECODING_WORK_MEM")
            .unwrap_or_else(|_| DECODING_WORK_MEM.to_owned());
        let options = format!(
            "{} -c logical_decoding_work_mem={work_mem}",
            config.get_options().unwrap_or_default()
        );
        params.push(("options", options.trim()));
        // Until ReadyForQuery, any failure is a failed connect: I/O and EOF stay transient.
        let during_startup = |e: WalStreamError| match e {
            WalStreamError::Io(e) => refused(e.to_string(), None),
            WalStreamError::Closed => refused("the server closed the connection".into(), None),
            e => e,
        };
        frontend::startup_message(params, &mut stream.write)
            .map_err(|e| unusable(e.to_string()))?;
        stream.flush().await.map_err(during_startup)?;
        let mut scram = None;
        let mut server_major = 0u32;
        loop {
            let (tag, body) = stream.recv().await.map_err(during_startup)?;
            match tag {
                b'R' => {
                    authenticate(&body, &config, &at, &mut scram, &mut stream.write)?;
                    stream.flush().await.map_err(during_startup)?;
                }
                b'E' => {
                    let (code, reason) = parse_error(&body);
                    return Err(refused(reason, Some(code)));
                }
                b'Z' => break,
                b'S' => {
                    let mut parts = body.split(|b| *b == 0);
                    if parts.next() == Some(b"server_version".as_slice()) {
                        server_major = parts
                            .next()
                            .and_then(|v| std::str::from_utf8(v).ok())
                            .and_then(|v| v.split(['.', ' ']).next()?.parse().ok())
                            .unwrap_or(0);
                    }
                }
                // BackendKeyData, NoticeResponse: nothing we use.
                b'K' | b'N' => {}
                other => return Err(unexpected(other, "startup")),
            }
        }

        // PostgreSQL 14+ streams transactions in progress (protocol 2): memory stays bounded
        // whatever a transaction's size.
        let protocol = if server_major >= 14 {
            "proto_version '2', streaming 'on'"
        } else {
            "proto_version '1'"
        };
        let command = format!(
            "START_REPLICATION SLOT {} LOGICAL {from} ({protocol}, publication_names {})",
            quote_ident(slot),
            quote_literal(&quote_ident(publication)),
        );
        frontend::query(&command, &mut stream.write)?;
        stream.flush().await?;
        match stream.recv_streaming().await?.0 {
            b'W' => {} // CopyBothResponse: streaming has begun
            other => return Err(unexpected(other, "START_REPLICATION")),
        }
        tracing::debug!(at = %at, slot, %from, "replication stream started");
        Ok(stream)
    }

    /// Next XLogData or keepalive. Cancel-safe: a partly received message stays buffered.
    pub async fn next(&mut self) -> Result<WalMessage, WalStreamError> {
        match self.recv_streaming().await? {
            (b'd', body) => parse_copy_data(body),
            (b'c', _) => Err(WalStreamError::Closed),
            (other, _) => Err(unexpected(other, "streaming")),
        }
    }

    /// Standby status update: written, flushed and applied up to `flushed`, which lets the
    /// server advance the slot's confirmed position there. `reply_requested` asks for an
    /// immediate keepalive.
    pub async fn confirm(
        &mut self,
        flushed: Lsn,
        reply_requested: bool,
    ) -> Result<(), WalStreamError> {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let since_pg = unix.saturating_sub(Duration::from_secs(PG_EPOCH_UNIX_SECS));
        let clock = i64::try_from(since_pg.as_micros()).unwrap_or(i64::MAX);
        let mut body = BytesMut::with_capacity(34);
        body.put_u8(b'r');
        for _ in 0..3 {
            body.put_u64(flushed.0);
        }
        body.put_i64(clock);
        body.put_u8(u8::from(reply_requested));
        frontend::CopyData::new(body.freeze())?.write(&mut self.write);
        self.flush().await
    }

    /// Next message after startup, skipping notices and parameter changes; an
    /// ErrorResponse becomes the error.
    async fn recv_streaming(&mut self) -> Result<(u8, Bytes), WalStreamError> {
        loop {
            match self.recv().await? {
                (b'E', body) => return Err(server_error(&body)),
                (b'N' | b'S', _) => {}
                message => return Ok(message),
            }
        }
    }

    /// Reads until one whole backend message is buffered; `read_buf` only, so cancel-safe.
    async fn recv(&mut self) -> Result<(u8, Bytes), WalStreamError> {
        loop {
            if let Some(message) = self.take_message()? {
                return Ok(message);
            }
            self.read.reserve(READ_CHUNK);
            if self.socket.read_buf(&mut self.read).await? == 0 {
                return Err(WalStreamError::Closed);
            }
        }
    }

    /// Splits one message (tag, body) off the read buffer when it is complete.
    fn take_message(&mut self) -> Result<Option<(u8, Bytes)>, WalStreamError> {
        let Some(header) = self.read.get(..5) else {
            return Ok(None);
        };
        let (tag, len) = (header[0], i32::from_be_bytes(array_at(header, 1)));
        let Some(total) = usize::try_from(len).ok().filter(|l| *l >= 4).map(|l| l + 1) else {
            let tag = char::from(tag);
            return Err(WalStreamError::Protocol(format!(
                "message {tag:?} of length {len}"
            )));
        };
        if self.read.len() < total {
            self.read.reserve(total - self.read.len());
            return Ok(None);
        }
        let mut message = self.read.split_to(total).freeze();
        message.advance(5);
        Ok(Some((tag, message)))
    }

    /// Writes out the buffered messages; what a cancelled call left behind goes first.
    async fn flush(&mut self) -> Result<(), WalStreamError> {
        while !self.write.is_empty() {
            if self.socket.write_buf(&mut self.write).await? == 0 {
                return Err(io::Error::from(io::ErrorKind::WriteZero).into());
            }
        }
        self.socket.flush().await?;
        Ok(())
    }
}

/// Tries the DSN's hosts in order (hostaddr before host, as tokio-postgres does); the
/// error names each failed address.
/// Asks the server for TLS (SSLRequest) and, when it agrees, runs the handshake; a server
/// that declines is used in the clear only when `sslmode` allows it.
async fn negotiate_tls(
    mut socket: Box<dyn Socket>,
    tls: std::sync::Arc<rustls::ClientConfig>,
    host: &str,
    mode: crate::conninfo::SslMode,
) -> Result<Box<dyn Socket>, String> {
    use crate::conninfo::SslMode;
    // Length 8, then the SSLRequest code 80877103.
    socket
        .write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = [0u8; 1];
    socket
        .read_exact(&mut answer)
        .await
        .map_err(|e| e.to_string())?;
    match answer[0] {
        b'S' => {
            let name = crate::tls::server_name(host)?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, socket)
                .await
                .map_err(|e| e.to_string())?;
            Ok(Box::new(stream))
        }
        b'N' if matches!(mode, SslMode::Allow | SslMode::Prefer) => Ok(socket),
        b'N' => Err(format!(
            "the server at {host} does not accept TLS connections"
        )),
        other => Err(format!(
            "unexpected answer {:?} to the TLS request",
            other as char
        )),
    }
}

async fn connect_socket(config: &Config) -> Result<(Box<dyn Socket>, Option<String>), String> {
    let (hosts, addrs) = (config.get_hosts(), config.get_hostaddrs());
    let ports = config.get_ports();
    let mut failures = Vec::new();
    for i in 0..hosts.len().max(addrs.len()) {
        let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
        let host = match (addrs.get(i), hosts.get(i)) {
            (Some(ip), _) => Host::Tcp(ip.to_string()),
            (None, Some(h)) => h.clone(),
            (None, None) => continue,
        };
        let attempt = open(&host, port);
        let result = match config.get_connect_timeout() {
            Some(limit) => tokio::time::timeout(*limit, attempt)
                .await
                .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into())),
            None => attempt.await,
        };
        match (result, host) {
            (Ok(socket), Host::Tcp(name)) => return Ok((socket, Some(name))),
            #[cfg(unix)]
            (Ok(socket), Host::Unix(_)) => return Ok((socket, None)),
            (Err(e), Host::Tcp(name)) => failures.push(format!("{name}:{port}: {e}")),
            #[cfg(unix)]
            (Err(e), Host::Unix(dir)) => failures.push(format!("{}:{port}: {e}", dir.display())),
        }
    }
    Err(failures.join("; "))
}

async fn open(host: &Host, port: u16) -> io::Result<Box<dyn Socket>> {
    match host {
        Host::Tcp(name) => {
            let tcp = TcpStream::connect((name.as_str(), port)).await?;
            // Status updates are tiny; Nagle would hold them back.
            tcp.set_nodelay(true)?;
            Ok(Box::new(tcp))
        }
        #[cfg(unix)]
        Host::Unix(dir) => {
            let path = dir.join(format!(".s.PGSQL.{port}"));
            Ok(Box::new(UnixStream::connect(path).await?))
        }
    }
}

/// Answers one AuthenticationRequest ('R') into `out`.
fn authenticate(
    body: &[u8],
    config: &Config,
    at: &str,
    scram: &mut Option<ScramSha256>,
    out: &mut BytesMut,
) -> Result<(), WalStreamError> {
    let protocol = |what: &str| WalStreamError::Protocol(format!("{at}: {what}"));
    let (kind, rest) = body
        .split_first_chunk::<4>()
        .ok_or_else(|| protocol("short authentication request"))?;
    let password = || {
        config
            .get_password()
            .ok_or_else(|| WalStreamError::Connect {
                at: at.to_owned(),
                reason: "the server asks for a password; the connection string has none".into(),
                code: Some("28P01".into()),
            })
    };
    let user = config.get_user().unwrap_or_default();
    match i32::from_be_bytes(*kind) {
        0 => {}
        3 => frontend::password_message(password()?, out)?,
        5 => {
            let salt = rest
                .first_chunk::<4>()
                .ok_or_else(|| protocol("short MD5 salt"))?;
            let hash = md5_hash(user.as_bytes(), password()?, *salt);
            frontend::password_message(hash.as_bytes(), out)?;
        }
        10 => {
            if !rest
                .split(|b| *b == 0)
                .any(|m| m == SCRAM_SHA_256.as_bytes())
            {
                let offered = String::from_utf8_lossy(rest).replace('\0', " ");
                return Err(WalStreamError::Unsupported(format!(
                    "{at}: the server offers SASL [{}], we speak only {SCRAM_SHA_256}",
                    offered.trim()
                )));
            }
            // No TLS, so no channel binding: "n" tells the server we cannot do it.
            let state = ScramSha256::new(password()?, ChannelBinding::unsupported());
            frontend::sasl_initial_response(SCRAM_SHA_256, state.message(), out)?;
            *scram = Some(state);
        }
        11 | 12 => {
            let state = scram
                .as_mut()
                .ok_or_else(|| protocol("SASL reply before SASL"))?;
            let scram_err = |e: io::Error| protocol(&format!("SCRAM: {e}"));
            if kind[3] == 11 {
                state.update(rest).map_err(scram_err)?;
                frontend::sasl_response(state.message(), out)?;
            } else {
                // Checks the server's signature: a server without our password cannot fake it.
                state.finish(rest).map_err(scram_err)?;
            }
        }
        other => {
            return Err(WalStreamError::Unsupported(format!(
                "{at}: authentication method {other} (we speak password, md5 and scram-sha-256)"
            )))
        }
    }
    Ok(())
}

/// SQLSTATE and text (message, detail, hint as [`crate::pg::describe`]) of an ErrorResponse.
fn parse_error(mut body: &[u8]) -> (String, String) {
    let (mut code, mut message) = (String::from("XX000"), String::from("(no message)"));
    let (mut detail, mut hint) = (String::new(), String::new());
    // Fields: type byte, NUL-terminated text; a zero type byte ends them.
    while let Some((&kind, rest)) = body.split_first() {
        let Some(end) = rest.iter().position(|b| *b == 0).filter(|_| kind != 0) else {
            break;
        };
        let value = String::from_utf8_lossy(&rest[..end]).into_owned();
        match kind {
            b'C' => code = value,
            b'M' => message = value,
            b'D' => detail = format!(" ({value})"),
            b'H' => hint = format!(" hint: {value}"),
            _ => {}
        }
        body = &rest[end + 1..];
    }
    (code, format!("{message}{detail}{hint}"))
}

/// An ErrorResponse after startup: a busy slot is told apart.
fn server_error(body: &[u8]) -> WalStreamError {
    match parse_error(body) {
        (code, message) if code == OBJECT_IN_USE => WalStreamError::SlotBusy(message),
        (code, message) => WalStreamError::Server { code, message },
    }
}

fn unexpected(tag: u8, during: &str) -> WalStreamError {
    let tag = char::from(tag);
    WalStreamError::Protocol(format!("unexpected message {tag:?} during {during}"))
}

/// CopyData payload: XLogData ('w': start, end, clock, data) or keepalive ('k': end,
/// clock, reply requested).
fn parse_copy_data(mut body: Bytes) -> Result<WalMessage, WalStreamError> {
    let short = |kind: char| WalStreamError::Protocol(format!("short {kind:?} message"));
    match body.first().copied() {
        Some(b'w') if body.len() >= 25 => {
            let wal_start = Lsn(u64::from_be_bytes(array_at(&body, 1)));
            body.advance(25); // kind, start, end and send time
            Ok(WalMessage::XLogData {
                wal_start,
                data: body,
            })
        }
        Some(b'k') if body.len() >= 18 => Ok(WalMessage::Keepalive {
            wal_end: Lsn(u64::from_be_bytes(array_at(&body, 1))),
            reply_requested: body[17] != 0,
        }),
        Some(kind @ (b'w' | b'k')) => Err(short(char::from(kind))),
        other => Err(WalStreamError::Protocol(format!(
            "unknown replication message {:?}",
            other.map(char::from)
        ))),
    }
}

/// `N` bytes at `at`; callers checked the length.
fn array_at<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut a = [0; N];
    a.copy_from_slice(&b[at..at + N]);
    a
}
