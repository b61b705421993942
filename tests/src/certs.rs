//! Certificates for TLS fixtures, made with the openssl CLI: a CA, a server certificate
//! for localhost, and client certificates for `cert` authentication.

use std::path::Path;
use std::process::Command;

pub fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A CA (`{name}-ca.crt`) and a server certificate for localhost signed by it.
pub fn make_ca_and_server_cert(dir: &Path, name: &str) -> anyhow::Result<()> {
    let ca_key = format!("{name}-ca.key");
    let ca_crt = format!("{name}-ca.crt");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name} test CA"),
            "-keyout",
            &ca_key,
            "-out",
            &ca_crt,
        ],
    )?;
    let ext = dir.join(format!("{name}.ext"));
    std::fs::write(&ext, "subjectAltName=DNS:localhost,IP:127.0.0.1\n")?;
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            &format!("{name}-server.key"),
            "-out",
            &format!("{name}-server.csr"),
        ],
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}-server.csr"),
            "-CA",
            &ca_crt,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext.to_string_lossy(),
            "-out",
            &format!("{name}-server.crt"),
        ],
    )?;
    Ok(())
}

/// A client certificate for `cert` authentication as `user` (`{user}.crt`, `{user}.key`,
/// the key readable by its owner only, as libpq requires), signed by the `{ca}` CA.
pub fn make_client_cert(dir: &Path, ca: &str, user: &str) -> anyhow::Result<()> {
    // X.509 v3 with client-auth usage: rustls refuses v1 certificates.
    let ext = dir.join(format!("{user}.ext"));
    std::fs::write(
        &ext,
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n",
    )?;
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN={user}"),
            "-keyout",
            &format!("{user}.key"),
            "-out",
            &format!("{user}.csr"),
        ],
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{user}.csr"),
            "-CA",
            &format!("{ca}-ca.crt"),
            "-CAkey",
            &format!("{ca}-ca.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext.to_string_lossy(),
            "-out",
            &format!("{user}.crt"),
        ],
    )?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        dir.join(format!("{user}.key")),
        std::fs::Permissions::from_mode(0o600),
    )?;
    Ok(())
}
