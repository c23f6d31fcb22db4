//! `vmm gen-certs DIR`: a private CA and one certificate for each end, in
//! one command, through `rcgen`.
//!
//! Written: `ca.pem` (the CA certificate, both ends trust it),
//! `source.pem`/`source.key` (client authentication) and
//! `destination.pem`/`destination.key` (server authentication, naming the
//! hosts given). Keys are written 0600. The CA's own key is never
//! written: it signs these two certificates and is gone, so nobody can
//! issue a third; run the command again for a new set.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use super::SecureError;

/// Names every certificate carries besides those asked for.
pub const DEFAULT_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// The files [`generate`] writes, relative to its directory.
pub const FILES: [&str; 5] = [
    "ca.pem",
    "source.pem",
    "source.key",
    "destination.pem",
    "destination.key",
];

/// Writes a CA and the two ends' certificates into `dir`, naming `hosts`
/// (plus [`DEFAULT_HOSTS`]); returns the paths written.
pub fn generate(dir: &Path, hosts: &[String]) -> Result<Vec<PathBuf>, SecureError> {
    std::fs::create_dir_all(dir).map_err(|source| SecureError::WriteFile {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut names: Vec<String> = DEFAULT_HOSTS.iter().map(|h| h.to_string()).collect();
    names.extend(
        hosts
            .iter()
            .filter(|h| !names.contains(h))
            .cloned()
            .collect::<Vec<_>>(),
    );
    let ca = new_ca()?;
    let mut written = vec![write(dir, "ca.pem", &ca.pem(), 0o644)?];
    for (end, usage) in [
        ("source", ExtendedKeyUsagePurpose::ClientAuth),
        ("destination", ExtendedKeyUsagePurpose::ServerAuth),
    ] {
        let key = KeyPair::generate().map_err(SecureError::Rcgen)?;
        let mut p = CertificateParams::new(names.clone()).map_err(SecureError::Rcgen)?;
        p.distinguished_name
            .push(DnType::CommonName, format!("migration {end}"));
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![usage];
        let cert = p.signed_by(&key, &ca).map_err(SecureError::Rcgen)?;
        written.push(write(dir, &format!("{end}.pem"), &cert.pem(), 0o644)?);
        written.push(write(
            dir,
            &format!("{end}.key"),
            &key.serialize_pem(),
            0o600,
        )?);
    }
    Ok(written)
}

fn new_ca() -> Result<CertifiedIssuer<'static, KeyPair>, SecureError> {
    let key = KeyPair::generate().map_err(SecureError::Rcgen)?;
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(SecureError::Rcgen)?;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.distinguished_name
        .push(DnType::CommonName, "migration CA");
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    CertifiedIssuer::self_signed(p, key).map_err(SecureError::Rcgen)
}

/// Writes `text` to `dir/name` with `mode`, whatever the umask and
/// whatever mode an older file had.
fn write(dir: &Path, name: &str, text: &str, mode: u32) -> Result<PathBuf, SecureError> {
    let path = dir.join(name);
    let err = |source| SecureError::WriteFile {
        path: path.clone(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&path)
        .map_err(err)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    Ok(path)
}
