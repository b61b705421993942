//! How to reach the Kafka brokers of a `kafka://` change log: addresses and transport
//! security (TLS, SASL), as librdkafka properties. SASL credentials are never stored in
//! the plan: each process (coordinator, workers) reads them from its own environment.

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// SASL user name and password, read when a client is configured.
pub const USERNAME_ENV: &str = "SCHEMASHIFT_KAFKA_USERNAME";
pub const PASSWORD_ENV: &str = "SCHEMASHIFT_KAFKA_PASSWORD";

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KafkaConn {
    pub brokers: Vec<String>,
    #[serde(default, skip_serializing_if = "KafkaSecurity::is_plain")]
    pub security: KafkaSecurity,
}

/// `security_protocol`, `ssl_ca`, `ssl_cert`, `ssl_key`, `sasl_mechanism` of the URL.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KafkaSecurity {
    /// plaintext, ssl, sasl_plaintext or sasl_ssl (librdkafka's default: plaintext).
    pub protocol: Option<String>,
    /// PEM CA that signed the brokers' certificates (default: the system's roots).
    pub ca: Option<PathBuf>,
    /// PEM client certificate and key, for brokers that ask for one.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512.
    pub sasl_mechanism: Option<String>,
}

const PROTOCOLS: [&str; 4] = ["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"];
const MECHANISMS: [&str; 3] = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"];

impl KafkaSecurity {
    pub fn is_plain(&self) -> bool {
        *self == KafkaSecurity::default()
    }

    /// Sets one URL option; false when `key` is not a security option.
    pub fn set(&mut self, key: &str, value: &str) -> Result<bool, String> {
        let path = || {
            if value.is_empty() {
                Err(format!("changelog: {key} needs a file path"))
            } else {
                Ok(Some(PathBuf::from(value)))
            }
        };
        match key {
            "security_protocol" => {
                let v = value.to_ascii_lowercase();
                if !PROTOCOLS.contains(&v.as_str()) {
                    return Err(format!(
                        "changelog: security_protocol {value:?} is not one of {}",
                        PROTOCOLS.join(", ")
                    ));
                }
                self.protocol = Some(v);
            }
            "sasl_mechanism" => {
                let v = value.to_ascii_uppercase();
                if !MECHANISMS.contains(&v.as_str()) {
                    return Err(format!(
                        "changelog: sasl_mechanism {value:?} is not one of {}",
                        MECHANISMS.join(", ")
                    ));
                }
                self.sasl_mechanism = Some(v);
            }
            "ssl_ca" => self.ca = path()?,
            "ssl_cert" => self.cert = path()?,
            "ssl_key" => self.key = path()?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The combination makes sense: SASL options with a SASL protocol, TLS files with a
    /// TLS one, a certificate with its key.
    pub fn validate(&self) -> Result<(), String> {
        let protocol = self.protocol.as_deref().unwrap_or("plaintext");
        let sasl = protocol.starts_with("sasl_");
        let tls = protocol.ends_with("ssl");
        if sasl && self.sasl_mechanism.is_none() {
            return Err(format!(
                "changelog: security_protocol {protocol} needs sasl_mechanism (one of {})",
                MECHANISMS.join(", ")
            ));
        }
        if !sasl && self.sasl_mechanism.is_some() {
            return Err(
                "changelog: sasl_mechanism needs security_protocol sasl_ssl (or sasl_plaintext)"
                    .into(),
            );
        }
        if !tls && (self.ca.is_some() || self.cert.is_some() || self.key.is_some()) {
            return Err(
                "changelog: ssl_ca, ssl_cert and ssl_key need security_protocol ssl or sasl_ssl"
                    .into(),
            );
        }
        if self.cert.is_some() != self.key.is_some() {
            return Err("changelog: ssl_cert and ssl_key go together".into());
        }
        Ok(())
    }

    /// What a process needs before it connects: readable files, and SASL credentials in
    /// its environment. Each problem names what to do.
    pub fn check_local(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (what, f) in [
            ("ssl_ca", &self.ca),
            ("ssl_cert", &self.cert),
            ("ssl_key", &self.key),
        ] {
            if let Some(f) = f {
                if let Err(e) = std::fs::metadata(f) {
                    problems.push(format!("changelog: {what} {}: {e}", f.display()));
                }
            }
        }
        if self.sasl_mechanism.is_some() {
            for var in [USERNAME_ENV, PASSWORD_ENV] {
                if std::env::var_os(var).is_none() {
                    problems.push(format!(
                        "changelog: sasl_mechanism is set but {var} is not (set it in the \
                         environment of the coordinator and of every worker)"
                    ));
                }
            }
        }
        problems
    }

    /// librdkafka properties for these options; the SASL password is read from the
    /// environment now, kept secret, and handed over only here.
    pub fn properties(&self) -> Vec<(&'static str, Property)> {
        let mut p = Vec::new();
        if let Some(v) = &self.protocol {
            p.push(("security.protocol", Property::Plain(v.clone())));
        }
        let file = |f: &PathBuf| Property::Plain(f.to_string_lossy().into_owned());
        if let Some(f) = &self.ca {
            p.push(("ssl.ca.location", file(f)));
        }
        if let Some(f) = &self.cert {
            p.push(("ssl.certificate.location", file(f)));
        }
        if let Some(f) = &self.key {
            p.push(("ssl.key.location", file(f)));
        }
        if let Some(m) = &self.sasl_mechanism {
            p.push(("sasl.mechanism", Property::Plain(m.clone())));
            if let Ok(u) = std::env::var(USERNAME_ENV) {
                p.push(("sasl.username", Property::Plain(u)));
            }
            if let Ok(pw) = std::env::var(PASSWORD_ENV) {
                p.push(("sasl.password", Property::Secret(SecretString::from(pw))));
            }
        }
        p
    }
}

/// A property value; a secret one is exposed only to librdkafka.
pub enum Property {
    Plain(String),
    Secret(SecretString),
}

impl Property {
    pub fn expose(&self) -> &str {
        match self {
            Property::Plain(s) => s,
            Property::Secret(s) => s.expose_secret(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(pairs: &[(&str, &str)]) -> Result<KafkaSecurity, String> {
        let mut s = KafkaSecurity::default();
        for (k, v) in pairs {
            assert!(s.set(k, v)?, "{k} is a security option");
        }
        s.validate()?;
        Ok(s)
    }

    #[test]
    fn tls_options_become_librdkafka_properties() {
        let s = with(&[
            ("security_protocol", "SSL"),
            ("ssl_ca", "/etc/kafka/ca.pem"),
            ("ssl_cert", "/etc/kafka/me.pem"),
            ("ssl_key", "/etc/kafka/me.key"),
        ])
        .expect("valid");
        let props: Vec<(&str, String)> = s
            .properties()
            .iter()
            .map(|(k, v)| (*k, v.expose().to_owned()))
            .collect();
        assert_eq!(
            props,
            [
                ("security.protocol", "ssl".to_owned()),
                ("ssl.ca.location", "/etc/kafka/ca.pem".to_owned()),
                ("ssl.certificate.location", "/etc/kafka/me.pem".to_owned()),
                ("ssl.key.location", "/etc/kafka/me.key".to_owned()),
            ]
        );
    }

    #[test]
    fn combinations_that_cannot_work_are_refused_with_what_to_do() {
        let e = with(&[("security_protocol", "sasl_ssl")]).expect_err("no mechanism");
        assert!(e.contains("needs sasl_mechanism"), "{e}");
        let e = with(&[("sasl_mechanism", "PLAIN")]).expect_err("plaintext");
        assert!(e.contains("needs security_protocol sasl_ssl"), "{e}");
        let e = with(&[("ssl_ca", "/ca.pem")]).expect_err("no tls");
        assert!(e.contains("need security_protocol ssl"), "{e}");
        let e = with(&[("security_protocol", "ssl"), ("ssl_cert", "/c.pem")]).expect_err("no key");
        assert!(e.contains("go together"), "{e}");
        let e = with(&[("security_protocol", "tls")]).expect_err("unknown");
        assert!(e.contains("is not one of"), "{e}");
        let e = with(&[("sasl_mechanism", "GSSAPI")]).expect_err("unsupported");
        assert!(e.contains("is not one of"), "{e}");
        let mut s = KafkaSecurity::default();
        assert_eq!(s.set("topic_prefix", "x"), Ok(false));
    }

    #[test]
    fn plain_brokers_serialize_as_before() {
        let c = KafkaConn {
            brokers: vec!["k:9092".into()],
            security: KafkaSecurity::default(),
        };
        assert_eq!(
            serde_json::to_string(&c).expect("json"),
            r#"{"brokers":["k:9092"]}"#
        );
        let back: KafkaConn = serde_json::from_str(r#"{"brokers":["k:9092"]}"#).expect("json");
        assert_eq!(back, c);
    }
}
