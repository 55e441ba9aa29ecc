//! The controller's TLS material in its data dir, made on first start:
//! `ca.pem` + `ca.key` (0600): a self-signed CA; `server.pem` (server cert + CA, so clients that
//! pin the CA by hash find it in the chain) + `server.key` (0600). The server certificate is
//! re-issued from the CA when the names it must cover change (`--advertise`, `--tls-san`).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::files::{read_string, write_private, write_public};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// TLS identity for the server plus the CA facts clients need.
#[derive(Clone)]
pub struct TlsMaterial {
    pub ca_pem: String,
    pub ca_sha256: [u8; 32],
    pub server_chain_pem: String,
    pub server_key_pem: String,
    /// Whether this call created the CA (a first start).
    pub created_ca: bool,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("ca_sha256", &hex::encode(self.ca_sha256))
            .finish()
    }
}

fn ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name
        .push(DnType::CommonName, "Canopy controller CA");
    p.distinguished_name
        .push(DnType::OrganizationName, "Canopy");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2124, 1, 1);
    Ok(p)
}

/// Loads the TLS material from `dir`, creating the CA and/or server certificate as needed.
/// `names` are the DNS names and IP addresses the server certificate must cover.
pub fn load_or_create(dir: &Path, names: &[String]) -> Result<TlsMaterial, TlsError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TlsError::Io { path, source }
    };
    let (ca_pem_path, ca_key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    let (srv_pem_path, srv_key_path) = (dir.join("server.pem"), dir.join("server.key"));
    let sans_path = dir.join("server.names");

    let created_ca = !(ca_pem_path.exists() && ca_key_path.exists());
    let (ca_pem, ca_key) = if !created_ca {
        let key = KeyPair::from_pem(&read_string(&ca_key_path).map_err(io(&ca_key_path))?)?;
        (read_string(&ca_pem_path).map_err(io(&ca_pem_path))?, key)
    } else {
        let key = KeyPair::generate()?;
        let cert = ca_params()?.self_signed(&key)?;
        write_private(&ca_key_path, key.serialize_pem().as_bytes()).map_err(io(&ca_key_path))?;
        write_public(&ca_pem_path, cert.pem().as_bytes()).map_err(io(&ca_pem_path))?;
        // A new CA invalidates any old server certificate.
        let _ = std::fs::remove_file(&srv_pem_path);
        (cert.pem(), key)
    };
    let ca_der = rustls_der(&ca_pem).ok_or_else(|| TlsError::Io {
        path: ca_pem_path.clone(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "no certificate in ca.pem"),
    })?;

    let wanted = names.join("\n");
    let current = read_string(&sans_path).unwrap_or_default();
    if !(srv_pem_path.exists() && srv_key_path.exists() && current == wanted) {
        let mut p = CertificateParams::new(names.to_vec())?;
        p.distinguished_name
            .push(DnType::CommonName, "Canopy controller");
        p.is_ca = IsCa::NoCa;
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.not_before = rcgen::date_time_ymd(2024, 1, 1);
        p.not_after = rcgen::date_time_ymd(2124, 1, 1);
        let key = KeyPair::generate()?;
        let issuer = Issuer::new(ca_params()?, &ca_key);
        let cert = p.signed_by(&key, &issuer)?;
        write_private(&srv_key_path, key.serialize_pem().as_bytes()).map_err(io(&srv_key_path))?;
        write_public(
            &srv_pem_path,
            format!("{}{}", cert.pem(), ca_pem).as_bytes(),
        )
        .map_err(io(&srv_pem_path))?;
        write_public(&sans_path, wanted.as_bytes()).map_err(io(&sans_path))?;
    }
    Ok(TlsMaterial {
        ca_sha256: canopy_proto::sha256(&ca_der),
        server_chain_pem: read_string(&srv_pem_path).map_err(io(&srv_pem_path))?,
        server_key_pem: read_string(&srv_key_path).map_err(io(&srv_key_path))?,
        ca_pem,
        created_ca,
    })
}

/// The DER of the first certificate in a PEM string (rustls-pki-types' PEM reader, as the
/// listener and the console use).
fn rustls_der(pem: &str) -> Option<Vec<u8>> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()?
        .ok()
        .map(|c| c.to_vec())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_ca_pin_is_the_hash_of_the_first_certificate_and_garbage_has_none() {
        let dir = tempfile::tempdir().unwrap();
        let t = super::load_or_create(dir.path(), &["localhost".into()]).unwrap();
        let der = super::rustls_der(&t.ca_pem).unwrap();
        assert_eq!(canopy_proto::sha256(&der), t.ca_sha256);
        // The chain starts with the server's certificate, not the CA's.
        let first = super::rustls_der(&t.server_chain_pem).unwrap();
        assert_ne!(first, der);
        assert!(super::rustls_der("no certificate here").is_none());
        assert!(
            super::rustls_der("-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n")
                .is_none()
        );
    }
}
