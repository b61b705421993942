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
            &format!("{name}-ca.key"),
            "-out",
            &format!("{name}-ca.crt"),
        ],
    )?;
    signed(
        dir,
        name,
        &format!("{name}-server"),
        "localhost",
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
}

/// A client certificate for `cert` authentication as `user` (`{user}.crt`, `{user}.key`,
/// the key readable by its owner only, as libpq requires), signed by the `{ca}` CA.
pub fn make_client_cert(dir: &Path, ca: &str, user: &str) -> anyhow::Result<()> {
    // X.509 v3 with client-auth usage: rustls refuses v1 certificates.
    signed(
        dir,
        ca,
        user,
        user,
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n",
    )?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        dir.join(format!("{user}.key")),
        std::fs::Permissions::from_mode(0o600),
    )?;
    Ok(())
}

/// `{stem}.key` and `{stem}.crt` for `cn`, signed by the `{ca}` CA with these extensions.
fn signed(dir: &Path, ca: &str, stem: &str, cn: &str, extensions: &str) -> anyhow::Result<()> {
    let ext = dir.join(format!("{stem}.ext"));
    std::fs::write(&ext, extensions)?;
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN={cn}"),
            "-keyout",
            &format!("{stem}.key"),
            "-out",
            &format!("{stem}.csr"),
        ],
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{stem}.csr"),
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
            &format!("{stem}.crt"),
        ],
    )
}
