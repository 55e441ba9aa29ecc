//! Client transport: a tonic [`Channel`] over TLS to a Canopy controller.
//!
//! The controller's certificate is issued by its own CA. A client trusts that CA either from a
//! PEM file (`--ca FILE`, the console) or from the SHA-256 pin in a join string (the agent): with a
//! pin, the CA certificate that the server sends in its chain must hash to the pin, and the server
//! certificate must then verify against it as the only trust anchor.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tonic::transport::{Channel, Endpoint};

/// How the client decides to trust the controller.
#[derive(Clone, Debug)]
pub enum Trust {
    /// SHA-256 of the controller's CA certificate (DER).
    Pin([u8; 32]),
    /// The controller's CA certificate(s), PEM.
    CaPem(Vec<u8>),
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("controller URL {0:?} is not of the form https://HOST:PORT")]
    Url(String),
    #[error("CA file holds no usable certificate: {0}")]
    CaFile(String),
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot reach controller at {url}: {reason}")]
    Connect { url: String, reason: String },
}

/// A parsed `https://host:port` controller URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControllerUrl {
    pub host: String,
    pub port: u16,
}

impl ControllerUrl {
    pub fn parse(url: &str) -> Result<Self, TransportError> {
        let bad = || TransportError::Url(url.to_string());
        let rest = url.strip_prefix("https://").ok_or_else(bad)?;
        let rest = rest.trim_end_matches('/');
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (h, p) = v6.split_once("]:").ok_or_else(bad)?;
            (h.to_string(), p)
        } else {
            let (h, p) = rest.rsplit_once(':').ok_or_else(bad)?;
            (h.to_string(), p)
        };
        let port = port.parse().map_err(|_| bad())?;
        if host.is_empty() || host.contains('/') {
            return Err(bad());
        }
        Ok(Self { host, port })
    }

    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the rustls client configuration for a trust choice (ALPN h2).
pub fn client_config(trust: &Trust) -> Result<rustls::ClientConfig, TransportError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let mut config = match trust {
        Trust::CaPem(pem) => {
            let mut roots = RootCertStore::empty();
            let mut n = 0;
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| TransportError::CaFile(e.to_string()))?;
                roots
                    .add(cert)
                    .map_err(|e| TransportError::CaFile(e.to_string()))?;
                n += 1;
            }
            if n == 0 {
                return Err(TransportError::CaFile("no PEM certificate found".into()));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::Pin(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCa {
                pin: *pin,
                provider,
            }))
            .with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Connects to the controller and returns a ready gRPC channel.
pub async fn connect(url: &str, trust: &Trust) -> Result<Channel, TransportError> {
    let target = ControllerUrl::parse(url)?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(client_config(trust)?));
    let server_name = ServerName::try_from(target.host.clone())
        .map_err(|_| TransportError::Url(url.to_string()))?;
    let authority = target.authority();
    // TLS is done by the connector below, so the endpoint itself speaks plain h2 over it.
    let endpoint = Endpoint::from_shared(format!("http://{authority}"))
        .map_err(|_| TransportError::Url(url.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let connector = tower::service_fn(move |_: http::Uri| {
        let tls = tls.clone();
        let server_name = server_name.clone();
        let authority = authority.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(&authority).await?;
            tcp.set_nodelay(true)?;
            let stream = tls.connect(server_name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|e| TransportError::Connect {
            url: url.to_string(),
            reason: error_chain(&e),
        })
}

/// The innermost readable reason of an error chain, for one-line messages.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = s.source();
    }
    parts.join(": ")
}

/// Trusts exactly the CA whose DER hashes to `pin`, found in the server's presented chain.
#[derive(Debug)]
struct PinnedCa {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| crate::sha256(c.as_ref()) == self.pin)
            .ok_or_else(|| {
                rustls::Error::General(
                    "controller's CA certificate does not match the pinned CA hash".into(),
                )
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controller_urls_parse_host_and_port() {
        assert_eq!(
            ControllerUrl::parse("https://127.0.0.1:7443").unwrap(),
            ControllerUrl {
                host: "127.0.0.1".into(),
                port: 7443
            }
        );
        assert_eq!(
            ControllerUrl::parse("https://[::1]:7443/").unwrap(),
            ControllerUrl {
                host: "::1".into(),
                port: 7443
            }
        );
        for bad in [
            "http://x:1",
            "https://x",
            "https://:1",
            "https://x:port",
            "x:1",
        ] {
            assert!(ControllerUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
