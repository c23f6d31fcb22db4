//! The stream-protection flags shared by `vmm migrate` and `vmm receive`
//! (see `migration::secure` for the modes), and `vmm gen-certs`.

use std::path::PathBuf;

use migration::secure::{certs, Protection, TlsFiles, PLAINTEXT_WARNING};
use serde_json::{json, Value};

/// How the migration's connections are protected.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ProtectionArgs {
    /// File with the shared secret (at least 16 bytes). The stream is
    /// encrypted and authenticated with Noise keyed from it.
    #[arg(
        long,
        required_unless_present = "tls_cert",
        conflicts_with = "tls_cert"
    )]
    pub secret: Option<PathBuf>,
    /// TLS 1.3 with mutual authentication: this end's certificate (PEM).
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// TLS: this end's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// TLS: the CA certificate the peer's certificate must chain to (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// Send guest memory and state UNENCRYPTED (trusted links only); the
    /// shared-secret handshake still authenticates both ends.
    #[arg(long, requires = "secret")]
    pub insecure_plaintext: bool,
}

impl ProtectionArgs {
    /// Shared-secret mode with the secret in `path`.
    pub fn with_secret(path: PathBuf) -> Self {
        Self {
            secret: Some(path),
            ..Self::default()
        }
    }

    fn tls_files(&self) -> Option<TlsFiles> {
        Some(TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            ca: self.tls_ca.clone()?,
        })
    }

    /// The protection the flags ask for (files read and checked).
    pub fn protection(&self) -> Result<Protection, String> {
        Protection::from_cli(
            self.secret.as_deref(),
            self.tls_files(),
            self.insecure_plaintext,
        )
    }

    /// Prints the plaintext warning, if the mode is plaintext.
    pub fn warn(&self) {
        if self.insecure_plaintext {
            eprintln!("{PLAINTEXT_WARNING}");
        }
    }

    /// The fields of a `migrate` request.
    pub fn to_json(&self) -> Value {
        json!({
            "secret_file": self.secret,
            "tls_cert": self.tls_cert,
            "tls_key": self.tls_key,
            "tls_ca": self.tls_ca,
            "insecure_plaintext": self.insecure_plaintext,
        })
    }
}

/// Arguments of `vmm gen-certs`.
#[derive(clap::Args, Debug)]
pub struct GenCertsArgs {
    /// Directory to write ca.pem, source.pem/.key, destination.pem/.key to.
    dir: PathBuf,
    /// A host name or address the destination is reached by (repeatable;
    /// localhost, 127.0.0.1 and ::1 are always included).
    #[arg(long = "host")]
    hosts: Vec<String>,
}

/// Writes a CA and both ends' certificates, and says how to use them.
pub fn gen_certs(args: GenCertsArgs) -> Result<(), String> {
    let written = certs::generate(&args.dir, &args.hosts).map_err(|e| {
        let mut s = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(c) = src {
            s += &format!(": {c}");
            src = c.source();
        }
        s
    })?;
    for p in &written {
        println!("{}", p.display());
    }
    let d = args.dir.display();
    println!(
        "source:      --tls-cert {d}/source.pem --tls-key {d}/source.key --tls-ca {d}/ca.pem\n\
         destination: --tls-cert {d}/destination.pem --tls-key {d}/destination.key --tls-ca {d}/ca.pem"
    );
    Ok(())
}
