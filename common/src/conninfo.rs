//! Connection strings as libpq reads them, URL or `key=value`, with the `PG*` environment
//! variables as defaults. tokio-postgres takes the connection part; the TLS settings it
//! does not know (`sslmode` verify-ca / verify-full / allow, `sslrootcert`, `sslcert`,
//! `sslkey`) and `passfile` are taken out here and applied by [`crate::tls`].

use std::path::PathBuf;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode={other} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                ))
            }
        })
    }
}

/// How to secure a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: SslMode,
    pub root_cert: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// A parsed connection string.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub config: tokio_postgres::Config,
    pub tls: TlsSettings,
}

/// The keys we take out before tokio-postgres sees the string.
const OURS: [&str; 5] = ["sslmode", "sslrootcert", "sslcert", "sslkey", "passfile"];

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn home_file(rel: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env("HOME")?).join(rel);
    p.exists().then_some(p)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(h), Some(l)) if hex(*h).is_some() && hex(*l).is_some() => {
                out.push((hex(*h).unwrap_or(0) * 16 + hex(*l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `key=value` pairs as libpq splits them: values may be single-quoted, with `\'` and
/// `\\` escapes.
fn split_pairs(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(c) = chars.peek().copied() {
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
            return Err(format!("connection string: missing \"=\" after {key:?}"));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    Some('\\') => value.extend(chars.next()),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => return Err("connection string: unterminated quoted value".into()),
                }
            }
        } else {
            while let Some(c) = chars.peek().copied() {
                if c.is_whitespace() {
                    break;
                }
                if c == '\\' {
                    chars.next();
                    value.extend(chars.next());
                } else {
                    value.push(c);
                    chars.next();
                }
            }
        }
        out.push((key, value));
    }
}

fn quote_value(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// The string without our keys, and our keys' values.
fn take_ours(dsn: &str) -> Result<(String, Vec<(String, String)>), String> {
    let mut ours = Vec::new();
    if dsn.starts_with("postgres://") || dsn.starts_with("postgresql://") {
        let Some((base, query)) = dsn.split_once('?') else {
            return Ok((dsn.to_owned(), ours));
        };
        let mut kept = Vec::new();
        for part in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            if OURS.contains(&k) {
                ours.push((k.to_owned(), percent_decode(v)));
            } else {
                kept.push(part);
            }
        }
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok((rest, ours));
    }
    let mut kept = Vec::new();
    for (k, v) in split_pairs(dsn)? {
        if OURS.contains(&k.as_str()) {
            ours.push((k, v));
        } else {
            kept.push(format!("{k}={}", quote_value(&v)));
        }
    }
    Ok((kept.join(" "), ours))
}

/// A password from a pgpass file (`host:port:db:user:password`, `*` matching anything).
fn pgpass(file: &std::path::Path, host: &str, port: u16, db: &str, user: &str) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    for line in text.lines() {
        if line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        // Fields split on unescaped colons; `\:` and `\\` are escapes.
        let mut fields = Vec::new();
        let mut cur = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => cur.extend(chars.next()),
                ':' if fields.len() < 4 => fields.push(std::mem::take(&mut cur)),
                c => cur.push(c),
            }
        }
        fields.push(cur);
        if fields.len() != 5 {
            continue;
        }
        let port = port.to_string();
        let want = [host, port.as_str(), db, user];
        if fields[..4]
            .iter()
            .zip(want)
            .all(|(f, w)| f == "*" || f == w)
        {
            return Some(fields[4].clone());
        }
    }
    None
}

/// Where a connection string points (hosts, ports, user, database) without reading any
/// file or environment variable: for messages and spans.
pub fn address(dsn: &str) -> Result<tokio_postgres::Config, String> {
    let (rest, _) = take_ours(dsn)?;
    rest.parse().map_err(|e| format!("{e}"))
}

/// Parses a connection string (with `PG*` environment defaults, as libpq).
pub fn parse(dsn: &str) -> Result<ConnInfo, String> {
    let (rest, ours) = take_ours(dsn)?;
    let get = |k: &str| {
        ours.iter()
            .rev()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    let mut config: tokio_postgres::Config = rest.parse().map_err(|e| format!("{e}"))?;
    let root_cert = get("sslrootcert")
        .or_else(|| env("PGSSLROOTCERT"))
        .map(PathBuf::from)
        .or_else(|| home_file(".postgresql/root.crt"));
    let mode: SslMode = match get("sslmode").or_else(|| env("PGSSLMODE")) {
        Some(m) => m.parse()?,
        None => SslMode::Prefer,
    };
    // libpq: a root certificate given with `require` makes it verify-ca.
    let mode = match (mode, get("sslrootcert").or_else(|| env("PGSSLROOTCERT"))) {
        (SslMode::Require, Some(_)) => SslMode::VerifyCa,
        (m, _) => m,
    };
    let tls = TlsSettings {
        mode,
        root_cert,
        cert: get("sslcert")
            .or_else(|| env("PGSSLCERT"))
            .map(PathBuf::from)
            .or_else(|| home_file(".postgresql/postgresql.crt")),
        key: get("sslkey")
            .or_else(|| env("PGSSLKEY"))
            .map(PathBuf::from)
            .or_else(|| home_file(".postgresql/postgresql.key")),
    };
    config.ssl_mode(match mode {
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Allow | SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
            tokio_postgres::config::SslMode::Require
        }
    });
    if config.get_password().is_none() {
        if let Some(p) = env("PGPASSWORD") {
            config.password(p);
        } else if let Some(file) = get("passfile")
            .or_else(|| env("PGPASSFILE"))
            .map(PathBuf::from)
            .or_else(|| home_file(".pgpass"))
        {
            let host = match config.get_hosts().first() {
                Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
                _ => "localhost".into(),
            };
            let port = config.get_ports().first().copied().unwrap_or(5432);
            let user = config.get_user().unwrap_or_default().to_owned();
            let db = config.get_dbname().unwrap_or(&user).to_owned();
            if let Some(p) = pgpass(&file, &host, port, &db, &user) {
                config.password(p);
            }
        }
    }
    Ok(ConnInfo { config, tls })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_and_key_value_forms_give_the_same_settings() {
        let url = parse(
            "postgres://app:s3cret@db.example.com:6432/shop?sslmode=verify-full&sslrootcert=%2Fca%20dir%2Froot.pem&application_name=x",
        )
        .expect("url");
        let kv = parse(
            "host=db.example.com port=6432 user=app password='s3cret' dbname=shop sslmode=verify-full sslrootcert='/ca dir/root.pem' application_name=x",
        )
        .expect("key=value");
        for c in [&url, &kv] {
            assert_eq!(c.tls.mode, SslMode::VerifyFull);
            assert_eq!(
                c.tls.root_cert.as_deref(),
                Some("/ca dir/root.pem".as_ref())
            );
            assert_eq!(c.config.get_dbname(), Some("shop"));
            assert_eq!(c.config.get_ports(), &[6432]);
            assert_eq!(c.config.get_password(), Some(b"s3cret".as_slice()));
            assert_eq!(
                c.config.get_ssl_mode(),
                tokio_postgres::config::SslMode::Require
            );
        }
    }

    #[test]
    fn quoted_values_keep_spaces_quotes_and_backslashes() {
        let c = parse(r"host=h user=u password='a b\'c\\d' dbname=x").expect("parses");
        assert_eq!(c.config.get_password(), Some(br"a b'c\d".as_slice()));
    }

    #[test]
    fn require_with_a_root_certificate_verifies_the_chain_and_bad_modes_are_named() {
        let c = parse("host=h user=u sslmode=require sslrootcert=/r.pem").expect("parses");
        assert_eq!(c.tls.mode, SslMode::VerifyCa);
        let e = parse("host=h user=u sslmode=sometimes").expect_err("bad mode");
        assert!(e.contains("sslmode=sometimes"), "{e}");
        assert_eq!(
            parse("host=h user=u sslmode=disable")
                .expect("parses")
                .tls
                .mode,
            SslMode::Disable
        );
    }

    #[test]
    fn pgpass_lines_match_with_wildcards_and_escapes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("pgpass");
        std::fs::write(
            &f,
            "# comment\nother:5432:*:u:no\nh:*:db:u:pa\\:ss\n*:*:*:*:fallback\n",
        )
        .expect("write");
        assert_eq!(pgpass(&f, "h", 6432, "db", "u").as_deref(), Some("pa:ss"));
        assert_eq!(pgpass(&f, "x", 1, "y", "z").as_deref(), Some("fallback"));
    }
}
